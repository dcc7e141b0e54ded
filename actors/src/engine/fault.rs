//! Test hooks that make an instance misbehave (fail, panic, stall). They exist
//! only with the `fault-injection` feature, which the test builds enable; a
//! release build of the binary carries an empty [`FaultSlot`] that compiles
//! to nothing.

use crate::error::EngineError;

/// A failure injected into an instance by tests: the next decode fails, panics
/// the instance's thread, or stalls (blocking without looking at cancellation).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    FailNextDecode,
    PanicNextDecode,
    StallNextDecode(std::time::Duration),
}

/// The fault waiting for an instance's next decode, if any.
#[derive(Debug, Default)]
pub struct FaultSlot {
    #[cfg(feature = "fault-injection")]
    next: Option<Fault>,
}

impl FaultSlot {
    #[cfg(feature = "fault-injection")]
    pub fn set(&mut self, fault: Fault) {
        self.next = Some(fault);
    }

    /// Called before each decode: applies and clears the pending fault.
    #[inline(always)]
    pub fn fire(&mut self) -> Result<(), EngineError> {
        #[cfg(feature = "fault-injection")]
        match self.next.take() {
            Some(Fault::FailNextDecode) => return Err(EngineError::Decode("injected decode failure".into())),
            Some(Fault::PanicNextDecode) => panic!("injected panic in the decode loop"),
            Some(Fault::StallNextDecode(d)) => std::thread::sleep(d),
            None => {}
        }
        Ok(())
    }
}
