//! Assembling a microVM: KVM VM, guest memory, boot data, devices, vCPUs.

use crate::arch::{boot, cpuid::CpuProfile, layout, mptable, regs};
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::devices::serial::{ConsoleSink, SerialDevice};
use crate::devices::virtio_mmio::{self, MmioWindow, VirtioSlot};
use crate::disk::LayeredDisk;
use crate::emulate::Symbols;
use crate::irq::IrqLine;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::vcpu::{RunControl, Vcpu, VcpuContext, VcpuSet};
use crate::VmmError;
use forkd_virtio::{BlockDevice, RngDevice, VirtioDevice, VsockDevice};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// A booted microVM.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub memory: GuestMemory,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio devices in attach order (root disk first, so it is `/dev/vda`).
    pub virtio: Vec<VirtioSlot>,
    pub vcpus: VcpuSet,
    pub control: Arc<RunControl>,
    pub profile: CpuProfile,
    pub cmdline: String,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Creates the KVM VM with in-kernel irqchip and PIT, and registers guest RAM.
pub fn create_vm(kvm: &Kvm, memory: &GuestMemory) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
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

        let console = match &config.console_log {
            Some(path) => Some(std::fs::File::create(path).map_err(|e| VmmError::Io {
                what: format!("creating console log {}", path.display()),
                source: e,
            })?),
            None => None,
        };
        let serial_irq = IrqLine::new(layout::SERIAL_IRQ).map_err(|e| VmmError::Io {
            what: "serial irq eventfd".into(),
            source: e,
        })?;
        vm.register_irqfd(serial_irq.event(), serial_irq.gsi())
            .map_err(kvm_err("register serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            ConsoleSink::new(console, config.console_echo),
        )));
        io_bus.insert(layout::SERIAL_PORT as u64, 8, serial.clone())?;

        let mut devices: Vec<(&str, Box<dyn VirtioDevice>)> = Vec::new();
        if let Some(disk) = &config.root_disk {
            let layered = LayeredDisk::open(&disk.base, &disk.layers)
                .map_err(|e| VmmError::Disk(e.to_string()))?;
            devices.push((
                "block",
                Box::new(BlockDevice::new(Box::new(layered)).with_disk_id("forkd-root")),
            ));
        }
        if let Some(vsock) = &config.vsock {
            let dev =
                VsockDevice::new(vsock.guest_cid, &vsock.uds_path).map_err(|e| VmmError::Io {
                    what: format!("vsock socket {}: {e}", vsock.uds_path.display()),
                    source: std::io::Error::other("vsock"),
                })?;
            devices.push(("vsock", Box::new(dev)));
        }
        if config.rng {
            devices.push(("rng", Box::new(RngDevice::new())));
        }
        let mut virtio = Vec::new();
        for (index, (_, device)) in devices.into_iter().enumerate() {
            let slot = virtio_mmio::attach(&vm, &memory, index as u32, device)?;
            mmio_bus.insert(
                slot.base,
                layout::VIRTIO_MMIO_SIZE,
                Arc::new(Mutex::new(MmioWindow(slot.transport.clone()))),
            )?;
            virtio.push(slot);
        }

        let cmdline = compose_cmdline(&config.cmdline, profile, &virtio);
        let kernel = boot::load_kernel(&memory, &config.kernel)?;
        boot::write_cmdline(&memory, &cmdline)?;
        boot::write_boot_params(&memory, cmdline.len() + 1)?;
        mptable::write(&memory, config.vcpus)?;
        regs::write_boot_tables(&memory)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        crate::vcpu::install_kick_handler()?;
        let control = Arc::new(RunControl::new().map_err(|e| VmmError::Io {
            what: "run control eventfd".into(),
            source: e,
        })?);
        let symbols = config
            .system_map
            .as_ref()
            .and_then(|p| match Symbols::load(p) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!("cannot read System.map {}: {e}", p.display());
                    None
                }
            });
        let ctx = VcpuContext {
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            memory: memory.clone(),
            control: control.clone(),
            symbols,
        };
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = Vcpu::create(&vm, id)?;
            vcpu.configure_boot(&supported, config.vcpus, profile, kernel.entry)?;
            vcpus.push(vcpu);
        }
        let handles = vcpus
            .into_iter()
            .map(|v| v.spawn(ctx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kvm,
            vm,
            memory,
            serial,
            virtio,
            vcpus: VcpuSet::new(handles, control.clone()),
            control,
            profile,
            cmdline,
        })
    }
}

/// The user's command line, then what the CPU profile needs, then the virtio devices.
fn compose_cmdline(base: &str, profile: CpuProfile, virtio: &[VirtioSlot]) -> String {
    let mut parts: Vec<String> = vec![base.trim().to_string(), profile.kernel_params().to_string()];
    parts.extend(virtio.iter().map(VirtioSlot::cmdline_entry));
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}
