//! The 8250 UART at COM1 (vm-superio), writing the guest console to a log file.
//!
//! Every console byte costs the guest a port-I/O exit, so production guests boot `quiet`; the
//! log still captures panics and anything the guest prints on purpose.

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use std::fs::File;
use std::io::{self, LineWriter, Write};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

/// Where console output goes: a log file, optionally echoed to the VMM's stderr.
pub struct ConsoleSink {
    file: Option<LineWriter<File>>,
    echo: bool,
}

impl ConsoleSink {
    pub fn new(file: Option<File>, echo: bool) -> Self {
        Self { file: file.map(LineWriter::new), echo }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = &mut self.file {
            // A full disk must not stop the guest; drop console bytes instead.
            let _ = f.write_all(buf);
        }
        if self.echo {
            let _ = io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
        Ok(())
    }
}

/// COM1 on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqLine, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        Self { serial: Serial::new(irq, sink) }
    }

    /// Swaps the interrupt line and console sink, keeping the UART's register state (BRANCH
    /// children get their own irqfd and console log).
    pub fn rewire(&mut self, irq: IrqLine, sink: ConsoleSink) {
        let state = self.serial.state();
        match Serial::from_state(&state, irq, NoEvents, sink) {
            Ok(serial) => self.serial = serial,
            Err(e) => tracing::warn!("serial state could not be carried over: {e:?}"),
        }
    }

    /// The UART's registers, for a durable snapshot.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }

    /// A UART with `state`'s registers on a new interrupt line and console sink (restore).
    /// vm-superio refuses only an input FIFO over its 64 bytes, which a snapshot never holds.
    pub fn restored(state: &SerialState, irq: IrqLine, sink: ConsoleSink) -> Result<Self, crate::VmmError> {
        Serial::from_state(state, irq, NoEvents, sink)
            .map(|serial| Self { serial })
            .map_err(|_| crate::VmmError::SerialFifo { bytes: state.in_buffer.len() })
    }

    pub fn irq(&self) -> &IrqLine {
        self.serial.interrupt_evt()
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

/// Serde for vm-superio's `SerialState` (the UART's registers, as a snapshot stores them).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "SerialState")]
pub struct SerialStateDef {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, value) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn bytes_written_to_thr_reach_the_log() {
        let mut log = tempfile::NamedTempFile::new().unwrap();
        let sink = ConsoleSink::new(Some(log.reopen().unwrap()), false);
        let mut dev = SerialDevice::new(IrqLine::new(4).unwrap(), sink);
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        dev.flush();
        let mut text = String::new();
        log.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello\n");
        // Line status register reports the transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
