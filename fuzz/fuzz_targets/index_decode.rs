//! Raw bytes into `IndexReader::new`; whatever it accepts is walked with every query.
//! Random bytes rarely pass the sha256 checksum, so this mostly exercises the header checks;
//! `index_decode_resealed` covers the structural validation behind the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    beam_fuzz::decode_and_walk(data);
});
