//! Discovery round-trip benchmark: written with the fakes in the next commit.

fn main() {}
