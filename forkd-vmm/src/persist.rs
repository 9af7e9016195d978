//! The machine's state as a durable snapshot holds it: every vCPU, the VM (irqchip, PIT,
//! clock), each virtio device (transport registers and device state) and the UART, gathered
//! into one serde struct. The snapshot writer serializes it (`vm-state.json`); a restore
//! rebuilds devices and vCPUs from it around memory mapped from the snapshot.
//!
//! BRANCH does not need this: its children inherit the live objects across `fork()`.

use crate::arch::cpuid::CpuProfile;
use crate::arch::state::{VcpuState, VmState};
use crate::devices::serial::SerialStateDef;
use crate::machine::{DeviceKind, FrozenState, Machine};
use forkd_virtio::{
    BlockDevice, BlockState, NetDevice, NetState, RngDevice, RngState, TransportState, VsockDevice, VsockState,
};
use serde::{Deserialize, Serialize};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "vm-state.json";

/// Version of [`MachineState`]'s layout; a restore refuses others.
pub const MACHINE_STATE_VERSION: u32 = 1;

/// Everything but guest memory and disk contents.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// In attach order (the order fixes each device's MMIO window and interrupt).
    pub devices: Vec<DeviceSnapshot>,
    #[serde(with = "SerialStateDef")]
    pub serial: vm_superio::serial::SerialState,
    pub profile: CpuProfile,
    /// The command line the guest booted with (virtio entries included).
    pub cmdline: String,
}

/// One virtio device.
#[derive(Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub kind: DeviceKind,
    pub transport: TransportState,
    pub device: DeviceState,
}

/// A virtio device's own state.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Vsock(VsockState),
    Net(NetState),
    Rng(RngState),
}

/// Why the state could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the {0} device slot does not hold the device its kind says")]
    WrongDevice(&'static str),
}

impl MachineState {
    /// The state of `machine`, whose vCPUs and VM were captured in `frozen` (a frozen copy:
    /// nothing runs that could change its devices).
    pub fn capture(machine: &Machine, frozen: &FrozenState) -> Result<Self, PersistError> {
        let mut devices = Vec::new();
        for (kind, slot) in &machine.virtio {
            let transport = crate::bus::lock(&slot.transport);
            let missing = PersistError::WrongDevice(kind.name());
            let device = match kind {
                DeviceKind::RootDisk => DeviceState::Block(transport.device::<BlockDevice>().ok_or(missing)?.state()),
                DeviceKind::Vsock => DeviceState::Vsock(transport.device::<VsockDevice>().ok_or(missing)?.state()),
                DeviceKind::Net => DeviceState::Net(transport.device::<NetDevice>().ok_or(missing)?.state()),
                DeviceKind::Rng => DeviceState::Rng(transport.device::<RngDevice>().ok_or(missing)?.state()),
            };
            devices.push(DeviceSnapshot { kind: *kind, transport: transport.state(), device });
        }
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            vcpus: frozen.vcpus.clone(),
            vm: frozen.vm.clone(),
            devices,
            serial: crate::bus::lock(&machine.serial).state(),
            profile: machine.profile,
            cmdline: machine.cmdline.clone(),
        })
    }
}
