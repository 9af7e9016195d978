//! Assembling a microVM: KVM VM, guest memory, boot data, devices, vCPUs; and rebuilding one
//! inside a BRANCH child around the memory it inherited.

use crate::arch::state::{self, VcpuState, VmState};
use crate::arch::{boot, cpuid::CpuProfile, layout, mptable, regs};
use crate::bus::{lock, Bus};
use crate::config::VmConfig;
use crate::devices::serial::{ConsoleSink, SerialDevice};
use crate::devices::virtio_mmio::{self, MmioWindow, VirtioSlot};
use crate::disk::{LayeredDisk, SharedDisk};
use crate::emulate::Symbols;
use crate::irq::IrqLine;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::vcpu::{RunControl, Vcpu, VcpuContext, VcpuSet};
use crate::VmmError;
use forkd_virtio::{BlockDevice, DeviceRewire, NetDevice, RngDevice, VirtioDevice, VsockDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Which virtio device a slot holds (the order of `Machine::virtio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    RootDisk,
    Vsock,
    Net,
    Rng,
}

impl DeviceKind {
    /// The device's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::RootDisk => "root disk",
            DeviceKind::Vsock => "vsock",
            DeviceKind::Net => "network",
            DeviceKind::Rng => "rng",
        }
    }
}

/// A running microVM.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub memory: GuestMemory,
    pub(crate) io_bus: Arc<Bus>,
    pub(crate) mmio_bus: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio devices in attach order (root disk first, so it is `/dev/vda`).
    pub virtio: Vec<(DeviceKind, VirtioSlot)>,
    /// The root disk, shared with its virtio-blk device (BRANCH freezes and re-tops it).
    pub disk: Option<Arc<Mutex<LayeredDisk>>>,
    pub vcpus: VcpuSet,
    pub control: Arc<RunControl>,
    pub profile: CpuProfile,
    pub cmdline: String,
    pub(crate) vcpu_count: u8,
    pub(crate) symbols: Option<Arc<Symbols>>,
    pub(crate) msr_indices: Arc<Vec<u32>>,
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// Creates the KVM VM with in-kernel irqchip and PIT, and registers guest RAM.
pub fn create_vm(kvm: &Kvm, memory: &GuestMemory) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize).map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the VM never outlives
        // (both live until the VMM process exits).
        unsafe { vm.set_user_memory_region(mapping) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(vm)
}

pub(crate) fn console_sink(path: &Option<PathBuf>, echo: bool) -> Result<ConsoleSink, VmmError> {
    let file = match path {
        Some(p) => Some(std::fs::File::create(p).map_err(io_err(format!("creating console log {}", p.display())))?),
        None => None,
    };
    Ok(ConsoleSink::new(file, echo))
}

pub(crate) fn serial_irq(vm: &VmFd) -> Result<IrqLine, VmmError> {
    let irq = IrqLine::new(layout::SERIAL_IRQ).map_err(io_err("serial irq eventfd"))?;
    vm.register_irqfd(irq.event(), irq.gsi()).map_err(kvm_err("register serial irqfd"))?;
    Ok(irq)
}

/// The configured command line, then the virtio devices.
fn compose_cmdline(base: &str, virtio: &[(DeviceKind, VirtioSlot)]) -> String {
    let mut parts: Vec<String> = vec![base.trim().to_string()];
    parts.extend(virtio.iter().map(|(_, slot)| slot.cmdline_entry()));
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

impl Machine {
    /// Builds the VM described by `config` and starts its vCPUs at the kernel entry point.
    pub fn boot(config: &VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let kvm = Kvm::new().map_err(|e| VmmError::KvmOpen(e.to_string()))?;
        let memory = create_guest_memory(config.memory_mib)?;
        let vm = create_vm(&kvm, &memory)?;
        let profile = config.cpu_profile.unwrap_or_else(CpuProfile::detect);

        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq(&vm)?,
            console_sink(&config.console_log, config.console_echo)?,
        )));
        io_bus.insert(layout::SERIAL_PORT as u64, 8, serial.clone())?;

        let mut devices: Vec<(DeviceKind, Box<dyn VirtioDevice>)> = Vec::new();
        let mut disk = None;
        if let Some(d) = &config.root_disk {
            let layered = Arc::new(Mutex::new(LayeredDisk::open(&d.base, &d.layers)?));
            let block = BlockDevice::new(Box::new(SharedDisk(layered.clone()))).with_disk_id("forkd-root");
            devices.push((DeviceKind::RootDisk, Box::new(block)));
            disk = Some(layered);
        }
        if let Some(vsock) = &config.vsock {
            let dev = VsockDevice::new(vsock.guest_cid, &vsock.uds_path)?;
            devices.push((DeviceKind::Vsock, Box::new(dev)));
        }
        if let Some(net) = &config.net {
            if net.tap_fd < 3 {
                return Err(VmmError::TapFd(net.tap_fd));
            }
            // SAFETY: the launcher opened the tap and left it open at this number for us
            // alone; nothing else in this process owns or closes it.
            let tap = unsafe { OwnedFd::from_raw_fd(net.tap_fd) };
            devices.push((DeviceKind::Net, Box::new(NetDevice::new(tap, net.mac.octets()))));
        }
        if config.rng {
            devices.push((DeviceKind::Rng, Box::new(RngDevice::new())));
        }
        let mut virtio = Vec::new();
        for (index, (kind, device)) in devices.into_iter().enumerate() {
            let slot = virtio_mmio::attach(&vm, &memory, index as u32, device, None)?;
            let window = Arc::new(Mutex::new(MmioWindow(slot.transport.clone())));
            mmio_bus.insert(slot.base, layout::VIRTIO_MMIO_SIZE, window)?;
            virtio.push((kind, slot));
        }

        let cmdline = compose_cmdline(&config.cmdline, &virtio);
        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        boot::write_cmdline(&memory, &cmdline)?;
        boot::write_boot_params(&memory, cmdline.len() + 1)?;
        mptable::write(&memory, config.vcpus)?;
        regs::write_boot_tables(&memory)?;

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
        crate::vcpu::install_kick_handler()?;
        let symbols = config.system_map.as_ref().and_then(|p| match Symbols::load(p) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                tracing::warn!("cannot read System.map {}: {e}", p.display());
                None
            }
        });
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let mut vcpu = Vcpu::create(&vm, id)?;
            vcpu.configure_boot(&supported, config.vcpus, profile, kernel.entry)?;
            vcpus.push(vcpu);
        }
        let msr_indices = Arc::new(state::savable_msrs(&kvm, vcpus[0].fd())?);
        let mut machine = Self {
            kvm,
            vm,
            memory,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            virtio,
            disk,
            vcpus: VcpuSet::new(Vec::new(), Arc::new(RunControl::new(0).map_err(io_err("run control"))?)),
            control: Arc::new(RunControl::new(config.vcpus as usize).map_err(io_err("run control eventfd"))?),
            profile,
            cmdline,
            vcpu_count: config.vcpus,
            symbols,
            msr_indices,
        };
        machine.start_vcpus(vcpus, false)?;
        Ok(machine)
    }

    pub(crate) fn start_vcpus(&mut self, vcpus: Vec<Vcpu>, background: bool) -> Result<(), VmmError> {
        let ctx = VcpuContext {
            io_bus: self.io_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
            memory: self.memory.clone(),
            control: self.control.clone(),
            symbols: self.symbols.clone(),
            msr_indices: self.msr_indices.clone(),
        };
        self.control.start_in_background(background);
        let run_size = self.vm.run_size();
        let handles = vcpus.into_iter().map(|v| v.spawn(ctx.clone(), run_size)).collect::<Result<Vec<_>, _>>()?;
        self.vcpus = VcpuSet::new(handles, self.control.clone());
        Ok(())
    }

    /// True when the VM has a network device (BRANCH then needs a tap per child).
    pub fn has_net(&self) -> bool {
        self.virtio.iter().any(|(kind, _)| *kind == DeviceKind::Net)
    }

    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// Parks the vCPUs and captures everything a forked child needs to resume the guest.
    /// The vCPUs stay parked until `thaw`.
    pub fn freeze(&mut self) -> Result<FrozenState, VmmError> {
        let vcpus = self.vcpus.park_and_save()?;
        let vm = state::save_vm(&self.vm)?;
        for (_, slot) in &self.virtio {
            lock(&slot.transport).prepare_fork();
        }
        lock(&self.serial).flush();
        Ok(FrozenState { vcpus, vm })
    }

    /// Lets the vCPUs run again after `freeze`.
    pub fn thaw(&self) {
        self.vcpus.resume();
    }

    /// Makes this (forked) process a new sandbox around the guest memory it inherited: a
    /// fresh KVM VM, the devices rewired to new fds and paths, vCPUs restored from `frozen`,
    /// ready for [`Machine::start_restored`]. Call only in a child of `fork()`, where no other
    /// thread of the parent exists.
    pub fn rebuild_in_child(
        self,
        frozen: &FrozenState,
        child: &ChildPaths,
        mut tap: Option<OwnedFd>,
    ) -> Result<(Machine, RestoredVcpus), VmmError> {
        let Machine {
            kvm,
            vm,
            memory,
            io_bus,
            mmio_bus,
            serial,
            virtio,
            disk,
            vcpus,
            profile,
            cmdline,
            vcpu_count,
            symbols,
            msr_indices,
            ..
        } = self;
        // The parent's vCPU threads were not forked: release the fds and kvm_run pages they
        // held, and forget the handles (joining or detaching them would touch dead threads).
        for fds in vcpus.kvm_fds() {
            fds.release_in_child();
        }
        std::mem::forget(vcpus);
        drop(vm);
        drop(kvm);

        let begun = std::time::Instant::now();
        let kvm = Kvm::new().map_err(|e| VmmError::KvmOpen(e.to_string()))?;
        let vm = create_vm(&kvm, &memory)?;
        let vm_created = begun.elapsed();
        {
            let mut serial = lock(&serial);
            serial.rewire(serial_irq(&vm)?, console_sink(&Some(child.console_log.clone()), false)?);
        }
        for (kind, slot) in &virtio {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("virtio irq eventfd"))?;
            let irq_for_vm = irq.try_clone().map_err(io_err("virtio irq eventfd"))?;
            let rewire = match kind {
                DeviceKind::RootDisk => {
                    // The disk itself was re-topped by `LayeredDisk::adopt_in_child`.
                    let shared = disk.clone().ok_or(VmmError::MissingDisk)?;
                    DeviceRewire::Block { backend: Box::new(SharedDisk(shared)) }
                }
                DeviceKind::Vsock => DeviceRewire::Vsock { uds_path: child.vsock_socket.clone() },
                DeviceKind::Net => DeviceRewire::Net { tap: tap.take().ok_or(VmmError::MissingTap)? },
                DeviceKind::Rng => DeviceRewire::Keep,
            };
            lock(&slot.transport)
                .rewire_after_fork(irq, rewire)
                .map_err(|source| VmmError::Rewire { device: kind.name(), source })?;
            virtio_mmio::register_with_vm(&vm, slot, &irq_for_vm)?;
        }
        let devices_rewired = begun.elapsed();
        state::restore_vm(&vm, &frozen.vm)?;
        let restored = frozen.vcpus.iter().map(|s| Vcpu::restore(&vm, s)).collect::<Result<Vec<_>, _>>()?;
        let state_restored = begun.elapsed();
        let control = Arc::new(RunControl::new(frozen.vcpus.len()).map_err(io_err("run control eventfd"))?);
        let machine = Machine {
            kvm,
            vm,
            memory,
            io_bus,
            mmio_bus,
            serial,
            virtio,
            disk,
            vcpus: VcpuSet::new(Vec::new(), control.clone()),
            control,
            profile,
            cmdline,
            vcpu_count,
            symbols,
            msr_indices,
        };
        tracing::debug!(
            "rebuilt over the inherited memory: VM created at {vm_created:?}, devices rewired at \
             {devices_rewired:?}, state restored at {state_restored:?}"
        );
        Ok((machine, RestoredVcpus(restored)))
    }

    /// Starts the vCPUs of a rebuilt child; with `background`, at `SCHED_IDLE` from their
    /// first instruction (see `branch::Background`).
    pub fn start_restored(&mut self, vcpus: RestoredVcpus, background: bool) -> Result<(), VmmError> {
        self.start_vcpus(vcpus.0, background)
    }
}

/// A rebuilt child's vCPUs: state restored, not running yet (see [`Machine::start_restored`]).
pub struct RestoredVcpus(Vec<Vcpu>);

/// What BRANCH captures in the parent while its vCPUs are parked.
pub struct FrozenState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
}

/// Where a BRANCH child keeps its own files.
#[derive(Debug, Clone)]
pub struct ChildPaths {
    pub dir: PathBuf,
    pub control_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    pub config: PathBuf,
}
