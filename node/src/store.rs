//! Chunk store: sparse image files written and read through memmap2, a persistent chunk bitmap in sled.
