//! Starting a VM from a durable snapshot instead of booting: guest RAM is the snapshot chain's
//! `memory.bin` files mapped `MAP_PRIVATE` (nothing is read up front: pages come from the page
//! cache on first touch, and every VM restored from one snapshot shares them), and devices and
//! vCPUs are rebuilt from `vm-state.json` around it with this VM's own disk layer, vsock
//! socket, tap and console. The vsock device tells the guest to drop its old connections, as
//! after a BRANCH.

use crate::arch::layout;
use crate::bus::Bus;
use crate::config::{RestoreConfig, VmConfig};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio_mmio::{self, MmioWindow};
use crate::disk::{LayeredDisk, SharedDisk};
use crate::emulate::Symbols;
use crate::machine::{console_sink, create_vm, io_err, serial_irq, DeviceKind, Machine};
use crate::memory::create_guest_memory;
use crate::persist::{DeviceState, MachineState, MACHINE_STATE_VERSION, STATE_FILE};
use crate::vcpu::{RunControl, Vcpu, VcpuSet};
use crate::VmmError;
use forkd_virtio::{BlockDevice, NetDevice, RngDevice, VirtioDevice, VsockDevice};
use kvm_ioctls::Kvm;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryBackend;

/// Why `vm-state.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("state version {found}, this forkd reads {MACHINE_STATE_VERSION}; upgrade forkd")]
    Version { found: u32 },
}

fn read_state(restore: &RestoreConfig) -> Result<MachineState, VmmError> {
    let path = restore.snapshot.join(STATE_FILE);
    let read = || -> Result<MachineState, StateFileError> {
        let state: MachineState = serde_json::from_slice(&std::fs::read(&path)?)?;
        if state.version != MACHINE_STATE_VERSION {
            return Err(StateFileError::Version { found: state.version });
        }
        Ok(state)
    };
    read().map_err(|reason| VmmError::SnapshotState { path: path.clone(), reason })
}

impl Machine {
    /// Rebuilds the VM a snapshot holds, per `config` (this sandbox's paths, disk chain, tap)
    /// and `restore`, and starts its vCPUs where they stopped.
    pub fn restore(config: &VmConfig, restore: &RestoreConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let state = read_state(restore)?;
        let kvm = Kvm::new().map_err(|e| VmmError::KvmOpen(e.to_string()))?;
        let memory = create_guest_memory(config.memory_mib)?;
        let bases: Vec<*mut u8> = memory.iter().map(|r| r.as_ptr()).collect();
        // SAFETY: each base starts one region of `memory`, a private anonymous reservation of
        // the plan's region size (the plan checks the sizes) that this VM owns and nothing
        // uses yet; mapping the snapshot's files over it replaces only that reservation.
        unsafe { restore.memory.map_into(&bases, libc::PROT_READ | libc::PROT_WRITE) }?;
        let vm = create_vm(&kvm, &memory)?;

        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let sink = console_sink(&config.console_log, config.console_echo)?;
        let serial = Arc::new(Mutex::new(SerialDevice::restored(&state.serial, serial_irq(&vm)?, sink)?));
        io_bus.insert(layout::SERIAL_PORT as u64, 8, serial.clone())?;

        let mut disk = None;
        let mut virtio = Vec::new();
        for (index, saved) in state.devices.iter().enumerate() {
            let device: Box<dyn VirtioDevice> = match (&saved.device, saved.kind) {
                (DeviceState::Block(st), DeviceKind::RootDisk) => {
                    let d = config.root_disk.as_ref().ok_or(VmmError::MissingDisk)?;
                    let layered = Arc::new(Mutex::new(LayeredDisk::open(&d.base, &d.layers)?));
                    disk = Some(layered.clone());
                    Box::new(BlockDevice::from_state(Box::new(SharedDisk(layered)), st)?)
                }
                (DeviceState::Vsock(st), DeviceKind::Vsock) => {
                    let v =
                        config.vsock.as_ref().ok_or(VmmError::DeviceMismatch { snapshot: "vsock", config: "none" })?;
                    Box::new(VsockDevice::from_state(st, &v.uds_path)?)
                }
                (DeviceState::Net(st), DeviceKind::Net) => {
                    let net =
                        config.net.as_ref().ok_or(VmmError::DeviceMismatch { snapshot: "network", config: "none" })?;
                    if net.tap_fd < 3 {
                        return Err(VmmError::TapFd(net.tap_fd));
                    }
                    // SAFETY: the launcher opened the tap and left it open at this number for us
                    // alone; nothing else in this process owns or closes it.
                    let tap = unsafe { OwnedFd::from_raw_fd(net.tap_fd) };
                    Box::new(NetDevice::from_state(st, tap))
                }
                (DeviceState::Rng(st), DeviceKind::Rng) => Box::new(RngDevice::from_state(st)),
                (_, kind) => return Err(VmmError::DeviceMismatch { snapshot: kind.name(), config: "another device" }),
            };
            let slot = virtio_mmio::attach(&vm, &memory, index as u32, device, Some(&saved.transport))?;
            let window = Arc::new(Mutex::new(MmioWindow(slot.transport.clone())));
            mmio_bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, window)?;
            virtio.push((saved.kind, slot));
        }
        if config.net.is_some() && !virtio.iter().any(|(k, _)| *k == DeviceKind::Net) {
            return Err(VmmError::DeviceMismatch { snapshot: "none", config: "network" });
        }

        crate::arch::state::restore_vm(&vm, &state.vm)?;
        let vcpus = state.vcpus.iter().map(|s| Vcpu::restore(&vm, s)).collect::<Result<Vec<_>, _>>()?;
        crate::vcpu::install_kick_handler()?;
        let first = vcpus.first().ok_or(VmmError::NoVcpus)?;
        let msr_indices = Arc::new(crate::arch::state::savable_msrs(&kvm, first.fd())?);
        let symbols = config.system_map.as_ref().and_then(|p| Symbols::load(p).ok().map(Arc::new));
        let control = Arc::new(RunControl::new(vcpus.len()).map_err(io_err("run control eventfd"))?);
        let mut machine = Machine {
            kvm,
            vm,
            memory,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            virtio,
            disk,
            vcpus: VcpuSet::new(Vec::new(), control.clone()),
            control,
            profile: state.profile,
            cmdline: state.cmdline,
            vcpu_count: state.vcpus.len() as u8,
            symbols,
            msr_indices,
        };
        machine.start_vcpus(vcpus, false)?;
        Ok(machine)
    }
}
