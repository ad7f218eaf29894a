//! The body of `POST /api/v1/sessions`, as the agent reads it.
#![no_main]

use cnitrace::contract::SessionRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<SessionRequest>(body) {
        let _ = serde_json::to_vec(&request);
    }
});
