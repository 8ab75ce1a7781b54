//! The device's check of a schedule message: decoding then rebuilding the plan (period grid,
//! sha256) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use max300_protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::Schedule(msg)) = Message::decode(data)
        && let Ok(schedule) = msg.to_schedule()
    {
        assert_eq!(schedule.sha256(), msg.sha256);
    }
});
