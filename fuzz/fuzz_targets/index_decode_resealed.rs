//! The input with its checksum recomputed (sha256 over the index with bytes [160..192)
//! zeroed, stored at [160..192)) before `IndexReader::new`, so that every mutation reaches the
//! structural validation; whatever it accepts is walked with every query.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    beam_fuzz::reseal(&mut bytes);
    beam_fuzz::decode_and_walk(&bytes);
});
