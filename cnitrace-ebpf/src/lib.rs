//! Empty library target so that `cnitrace` can name this crate as a build dependency.
#![no_std]
