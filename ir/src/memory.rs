//! How much memory the machine can still give, so that weights or a plan's buffers that
//! would not fit are refused with their size before anything is allocated (on Linux an
//! allocation past what is there succeeds, and the process is killed later, without a word,
//! as it writes the pages).

use std::path::Path;

/// Bytes this process can still allocate: the kernel's estimate of available memory
/// (`MemAvailable`, page cache that can be dropped included), bounded by the room left under
/// the memory limit of the process's control group (a container's limit), where there is
/// one. `None` where neither can be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| meminfo_available(&text));
    let group = cgroup_room(Path::new("/sys/fs/cgroup"));
    match (machine, group) {
        (Some(m), Some(g)) => Some(m.min(g)),
        (m, g) => m.or(g),
    }
}

/// The memory available where `bytes` are more than it: `Some(available)` to refuse them
/// with, `None` where they fit (or the memory left cannot be read).
pub fn short_of(bytes: u64) -> Option<u64> {
    available_bytes().filter(|&available| bytes > available)
}

/// The product of sizes (a shape's extents, an element's bytes), `u64::MAX` where it
/// overflows: more than any memory holds.
pub fn product(sizes: impl IntoIterator<Item = usize>) -> u64 {
    sizes
        .into_iter()
        .fold(1u64, |n, x| n.saturating_mul(x as u64))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The room left under the control group's memory limit (cgroup v2's `memory.max`, else
/// v1's `memory.limit_in_bytes`), counting inactive file pages as free, as the kernel
/// reclaims them before it kills anything; `None` without a limit.
fn cgroup_room(root: &Path) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let number = |text: Option<String>| text?.trim().parse::<u64>().ok();
    let stat = |text: Option<String>, key: &str| {
        text?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    // The limit first: without one (v2's "max", v1's largest page-aligned i64) the usage
    // and the statistics (a long file) are not read.
    let (v2, limit) = match read("memory.max") {
        Some(max) => (true, max.trim().parse::<u64>().ok()?),
        None => (false, number(read("memory/memory.limit_in_bytes"))?),
    };
    if limit >= 1 << 62 {
        return None;
    }
    let (usage, inactive) = if v2 {
        (
            number(read("memory.current"))?,
            stat(read("memory.stat"), "inactive_file").unwrap_or(0),
        )
    } else {
        (
            number(read("memory/memory.usage_in_bytes"))?,
            stat(read("memory/memory.stat"), "total_inactive_file").unwrap_or(0),
        )
    };
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

/// `bytes` for people: "512 B", "3.4 MiB", "1.25 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value < 10.0 { 2 } else { 1 };
    format!("{value:.digits$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_the_available_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   23332588 kB\n";
        assert_eq!(meminfo_available(text), Some(23_332_588 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(meminfo_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn a_control_groups_limit_bounds_the_room_and_no_limit_is_none() {
        let dir = std::env::temp_dir().join(format!("zebra-cgroup-{}", std::process::id()));
        let v2 = dir.join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(v2.join("memory.current"), "536870912\n").unwrap();
        std::fs::write(v2.join("memory.stat"), "anon 1\ninactive_file 268435456\n").unwrap();
        // 1 GiB limit, 512 MiB used of which 256 MiB reclaimable file pages: 768 MiB room.
        assert_eq!(cgroup_room(&v2), Some(768 << 20));
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_room(&v2), None);

        let v1 = dir.join("v1/memory");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "695713792\n").unwrap();
        assert_eq!(cgroup_room(&dir.join("v1")), None);
        std::fs::write(v1.join("memory.limit_in_bytes"), "2147483648\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "3221225472\n").unwrap();
        // Over the limit (caches not yet reclaimed, no stat file): no room, not an underflow.
        assert_eq!(cgroup_room(&dir.join("v1")), Some(0));
        assert_eq!(cgroup_room(&dir.join("none")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn products_saturate_and_nothing_is_short_of_zero_bytes() {
        assert_eq!(product([2, 3, 4]), 24);
        assert_eq!(product([]), 1);
        assert_eq!(product([usize::MAX, usize::MAX]), u64::MAX);
        assert_eq!(short_of(0), None);
        if let Some(available) = available_bytes() {
            assert_eq!(short_of(u64::MAX), Some(available));
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.00 MiB");
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(human(100 << 30), "100.0 GiB");
        assert_eq!(human(u64::MAX), "16384.0 PiB");
    }
}
