//! Generic cell rate algorithm (GCRA) in integer nanoseconds, shared by the engine and the XDP program.
