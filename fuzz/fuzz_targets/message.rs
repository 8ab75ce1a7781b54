//! Every MQTT payload decoder: any bytes, never a panic; whatever decodes encodes and decodes
//! back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use max300_protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode(data) {
        let again = Message::decode(&msg.encode()).expect("an encoded message decodes");
        assert_eq!(again, msg);
    }
});
