//! Raw bytes as a packed (lz4) index, as `beam convert` stores indexes by default: the
//! unpacking must refuse what it cannot unpack within its limit, and whatever it unpacks goes
//! through the same decode and walk as `index_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beam_fuzz::unpack_decode_and_walk(data);
});
