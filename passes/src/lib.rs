//! Zebra's optimizer: equality saturation over the graph IR (fusion, block-sparse tile
//! schedules, layer sharing) and reverse-mode autodiff.
