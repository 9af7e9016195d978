//! XSAVE, XSAVEOPT and XRSTOR in the standard (uncompacted) format, completed against the
//! vCPU's extended state as KVM exposes it (KVM_GET_XSAVE / KVM_SET_XSAVE, whose 4 KiB region is
//! itself a standard-format XSAVE area, and XCR0 from KVM_GET_XCRS).
//!
//! Semantics follow the Intel SDM, vol. 1, ch. 13: the requested-feature bitmap is
//! RFBM = XCR0 & EDX:EAX. XSAVE/XSAVEOPT write the components in RFBM (x87 and SSE into the
//! FXSAVE-layout legacy region, MXCSR when SSE or AVX is requested, the others at the offsets
//! CPUID leaf 0xd gives) and set XSTATE_BV[i] = XINUSE[i] for i in RFBM, leaving the rest of
//! the header alone. XRSTOR loads the components in RFBM whose XSTATE_BV bit is set, puts those
//! whose bit is clear into their initial configuration, and loads MXCSR whenever SSE or AVX is
//! requested. Faults are delivered to the guest, not completed: #GP(0) for a misaligned or
//! non-canonical area, a compacted or malformed header, or reserved MXCSR bits; #PF where the
//! guest's page tables refuse the access. XSAVEOPT never uses the modified optimization, which
//! the SDM allows.

use super::paging::{AccessError, GuestVirtualMemory};
use super::Exception;

/// Size of KVM's `kvm_xsave` region and so the largest area this module handles.
pub const REGION_SIZE: usize = 4096;

/// A standard-format XSAVE image of the vCPU's state.
pub type Region = [u8; REGION_SIZE];

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;

/// Byte ranges of the legacy region (FXSAVE layout) and the header.
const X87_CONTROL: std::ops::Range<usize> = 0..24; // FCW, FSW, FTW, FOP, FIP, FDP
const MXCSR_AND_MASK: std::ops::Range<usize> = 24..32;
const MXCSR: std::ops::Range<usize> = 24..28;
const MXCSR_MASK: std::ops::Range<usize> = 28..32;
const X87_REGISTERS: std::ops::Range<usize> = 32..160; // ST0-ST7 / MM0-MM7
const XMM_REGISTERS: std::ops::Range<usize> = 160..416; // XMM0-XMM15
const XSTATE_BV: std::ops::Range<usize> = 512..520;
const XCOMP_BV: std::ops::Range<usize> = 520..528;
/// Bytes 23:8 of the header (XCOMP_BV and the first reserved quadword) must be zero for the
/// standard form of XRSTOR.
const HEADER_MUST_BE_ZERO: std::ops::Range<usize> = 520..536;
/// The legacy region plus the header: the smallest area.
const HEADER_END: usize = 576;
/// Where the upper halves of FIP and FDP (or FCS and FDS, without REX.W) live.
const FIP_HIGH: std::ops::Range<usize> = 12..16;
const FDP_HIGH: std::ops::Range<usize> = 20..24;

const MXCSR_INIT: u32 = 0x1f80;
/// The MXCSR_MASK to assume when the saved one is zero (SDM, "Guidelines for Writing to MXCSR").
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;
const FCW_INIT: u16 = 0x037f;

/// Which instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Xsave,
    Xsaveopt,
    Xrstor,
}

/// One XSAVE-family instruction to complete.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub op: Op,
    /// Linear address of the XSAVE area.
    pub addr: u64,
    /// EDX:EAX, the instruction's feature mask.
    pub mask: u64,
    /// REX.W form: 64-bit FIP/FDP instead of 32-bit offsets with FCS/FDS.
    pub rex_w: bool,
}

/// Where the standard format puts the components above SSE (CPUID leaf 0xd, sub-leaf i:
/// EAX = size, EBX = offset). Components that do not fit the 4 KiB KVM region are absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    components: [Option<(usize, usize)>; 64],
    /// CPUID.(0xd,0).ECX: the area size all supported user components need.
    max_size: usize,
}

impl Layout {
    /// Builds the layout from a CPUID leaf 0xd sub-leaf reader returning (EAX, EBX, ECX).
    pub fn from_cpuid(mut subleaf: impl FnMut(u32) -> (u32, u32, u32)) -> Self {
        let mut components = [None; 64];
        let (eax, _, max_size) = subleaf(0);
        for (i, slot) in components.iter_mut().enumerate().skip(2) {
            // Only user components (XCR0 bits) are listed in EAX/EDX of sub-leaf 0; the low
            // 32 bits cover everything defined so far.
            if i >= 32 || eax & (1 << i) == 0 {
                continue;
            }
            let (size, offset, ecx) = subleaf(i as u32);
            let (size, offset) = (size as usize, offset as usize);
            // ECX bit 0 marks supervisor (IA32_XSS) components, which the standard form lacks.
            if ecx & 1 == 0 && size > 0 && offset >= HEADER_END && offset + size <= REGION_SIZE {
                *slot = Some((offset, size));
            }
        }
        Self { components, max_size: max_size as usize }
    }

    /// Size of the XSAVE area for every user component the CPU supports.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// The host's layout; guest kernel mode on an emulating host sees the host's leaf 0xd.
    pub fn host() -> &'static Layout {
        static HOST: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
        HOST.get_or_init(|| {
            Layout::from_cpuid(|i| {
                let r = std::arch::x86_64::__cpuid_count(0xd, i);
                (r.eax, r.ebx, r.ecx)
            })
        })
    }

    /// Byte range of extended component `i` (2..64).
    fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let (offset, size) = (*self.components.get(i)?)?;
        Some(offset..offset + size)
    }

    /// Extended components (2..64) in `rfbm` with their byte ranges; an error names the first
    /// requested component the layout does not know.
    fn extended(&self, rfbm: u64) -> Result<Vec<(u64, std::ops::Range<usize>)>, XsaveError> {
        (2..64)
            .filter(|i| rfbm & (1u64 << i) != 0)
            .map(|i| self.range(i).map(|r| (1u64 << i, r)).ok_or(XsaveError::UnknownComponent(i as u32)))
            .collect()
    }
}

/// Access to the vCPU's extended state; KVM in the VMM, a plain struct in tests.
pub trait ExtendedState {
    /// The vCPU's XCR0.
    fn xcr0(&mut self) -> Result<u64, String>;
    /// The vCPU's registers as a standard-format XSAVE image (XSTATE_BV = XINUSE).
    fn get(&mut self) -> Result<Box<Region>, String>;
    /// Loads the vCPU's registers from a standard-format XSAVE image.
    fn set(&mut self, region: &Region) -> Result<(), String>;
}

/// Why an instruction could not be completed (as opposed to faulting in the guest).
#[derive(Debug, thiserror::Error)]
pub enum XsaveError {
    #[error("vCPU extended state: {0}")]
    State(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("XCR0 enables state component {0}, whose layout is unknown or beyond the 4 KiB KVM_GET_XSAVE region")]
    UnknownComponent(u32),
}

/// Runs `req`. `Ok(None)`: completed, advance RIP. `Ok(Some(e))`: deliver `e` to the guest and
/// leave RIP on the instruction. State and memory are changed only on completion, except that
/// a #PF in the middle of XSAVE may leave the area partly written, as on a real CPU.
pub fn execute(
    req: &Request,
    state: &mut dyn ExtendedState,
    layout: &Layout,
    mem: &dyn GuestVirtualMemory,
) -> Result<Option<Exception>, XsaveError> {
    let xcr0 = state.xcr0().map_err(XsaveError::State)?;
    let rfbm = xcr0 & req.mask;
    let extended = layout.extended(rfbm)?;
    let end = extended.iter().map(|(_, r)| r.end).fold(HEADER_END, usize::max);
    if !req.addr.is_multiple_of(64) || !canonical(req.addr) || !canonical(req.addr.wrapping_add(end as u64 - 1)) {
        return Ok(Some(Exception::GeneralProtection));
    }
    let result = match req.op {
        Op::Xsave | Op::Xsaveopt => save(req, rfbm, &extended, state, mem),
        Op::Xrstor => restore(req, xcr0, rfbm, &extended, end, state, mem),
    };
    match result {
        Ok(()) => Ok(None),
        Err(Outcome::Fault(e)) => Ok(Some(e)),
        Err(Outcome::Error(e)) => Err(e),
    }
}

/// Early exits of `save`/`restore`.
enum Outcome {
    Fault(Exception),
    Error(XsaveError),
}

impl From<AccessError> for Outcome {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::PageFault { addr, error_code } => Outcome::Fault(Exception::PageFault { addr, error_code }),
            AccessError::Unusable(reason) => Outcome::Error(XsaveError::Memory(reason)),
        }
    }
}

impl From<XsaveError> for Outcome {
    fn from(e: XsaveError) -> Self {
        Outcome::Error(e)
    }
}

fn save(
    req: &Request,
    rfbm: u64,
    extended: &[(u64, std::ops::Range<usize>)],
    state: &mut dyn ExtendedState,
    mem: &dyn GuestVirtualMemory,
) -> Result<(), Outcome> {
    let mut image = state.get().map_err(XsaveError::State)?;
    if !req.rex_w {
        // 32-bit format: FCS and FDS in the upper halves; KVM does not keep them.
        image[FIP_HIGH].fill(0);
        image[FDP_HIGH].fill(0);
    }
    let xinuse = read_u64(&image[..], XSTATE_BV.start);
    let mut bv = [0u8; 8];
    mem.read(req.addr + XSTATE_BV.start as u64, &mut bv)?;
    let xstate_bv = (u64::from_le_bytes(bv) & !rfbm) | (xinuse & rfbm);

    let mut pieces: Vec<std::ops::Range<usize>> = Vec::new();
    if rfbm & X87 != 0 {
        pieces.extend([X87_CONTROL, X87_REGISTERS]);
    }
    if rfbm & (SSE | AVX) != 0 {
        pieces.push(MXCSR_AND_MASK);
    }
    if rfbm & SSE != 0 {
        pieces.push(XMM_REGISTERS);
    }
    pieces.extend(extended.iter().map(|(_, r)| r.clone()));
    pieces.sort_by_key(|r| r.start);
    for r in pieces {
        mem.write(req.addr + r.start as u64, &image[r])?;
    }
    mem.write(req.addr + XSTATE_BV.start as u64, &xstate_bv.to_le_bytes())?;
    Ok(())
}

fn restore(
    req: &Request,
    xcr0: u64,
    rfbm: u64,
    extended: &[(u64, std::ops::Range<usize>)],
    end: usize,
    state: &mut dyn ExtendedState,
    mem: &dyn GuestVirtualMemory,
) -> Result<(), Outcome> {
    let gp = || Outcome::Fault(Exception::GeneralProtection);
    let mut area = vec![0u8; end];
    mem.read(req.addr, &mut area)?;
    let xstate_bv = read_u64(&area, XSTATE_BV.start);
    // XCOMP_BV[63] selects the compacted form, which this guest kernel is kept off
    // (clearcpuid=xsavec,xsaves); refusing it like a malformed header is the safe answer.
    let compacted = read_u64(&area, XCOMP_BV.start) >> 63 != 0;
    if compacted || xstate_bv & !xcr0 != 0 || area[HEADER_MUST_BE_ZERO].iter().any(|b| *b != 0) {
        return Err(gp());
    }
    let mut image = state.get().map_err(XsaveError::State)?;
    if rfbm & (SSE | AVX) != 0 {
        let mxcsr = read_u32(&area, MXCSR.start);
        let mask = match read_u32(&image[..], MXCSR_MASK.start) {
            0 => MXCSR_MASK_DEFAULT,
            m => m,
        };
        if mxcsr & !mask != 0 {
            return Err(gp());
        }
        image[MXCSR].copy_from_slice(&mxcsr.to_le_bytes());
    }
    let load = rfbm & xstate_bv;
    if rfbm & X87 != 0 {
        if load & X87 != 0 {
            image[X87_CONTROL].copy_from_slice(&area[X87_CONTROL]);
            image[X87_REGISTERS].copy_from_slice(&area[X87_REGISTERS]);
            if !req.rex_w {
                image[FIP_HIGH].fill(0);
                image[FDP_HIGH].fill(0);
            }
        } else {
            image[X87_CONTROL].fill(0);
            image[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
            image[X87_REGISTERS].fill(0);
        }
    }
    if rfbm & SSE != 0 {
        let src = if load & SSE != 0 { &area[XMM_REGISTERS] } else { &[0u8; 256][..] };
        image[XMM_REGISTERS].copy_from_slice(src);
    }
    for (bit, r) in extended {
        if load & bit != 0 {
            image[r.clone()].copy_from_slice(&area[r.clone()]);
        } else {
            // The initial configuration of every user component above SSE is all zeros.
            image[r.clone()].fill(0);
        }
    }
    let mut xinuse = (read_u64(&image[..], XSTATE_BV.start) & !rfbm) | load;
    if read_u32(&image[..], MXCSR.start) != MXCSR_INIT {
        // A non-default MXCSR means SSE state is in use; KVM keeps MXCSR only then.
        xinuse |= SSE;
    }
    image[XSTATE_BV].copy_from_slice(&xinuse.to_le_bytes());
    state.set(&image).map_err(XsaveError::State)?;
    Ok(())
}

/// 48-bit canonical (the guest kernel here uses 4-level paging).
fn canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// An AMD Zen 4 style layout: AVX at 576, opmask at 832, ZMM_Hi256 at 896, Hi16_ZMM at 1408.
    pub fn amd_layout() -> Layout {
        Layout::from_cpuid(|i| match i {
            0 => (0xe7, 2432, 2432),
            2 => (256, 576, 0),
            5 => (64, 832, 0),
            6 => (512, 896, 0),
            7 => (1024, 1408, 0),
            _ => (0, 0, 0),
        })
    }

    /// A vCPU whose registers hold a recognisable pattern in every byte of every component.
    pub struct FakeState {
        pub xcr0: u64,
        pub region: Box<Region>,
        pub sets: usize,
    }

    impl FakeState {
        pub fn new(xcr0: u64) -> Self {
            let mut region = Box::new([0u8; REGION_SIZE]);
            for (i, b) in region.iter_mut().enumerate() {
                *b = (i * 7 + 1) as u8;
            }
            region[MXCSR].copy_from_slice(&0x1f80u32.to_le_bytes());
            region[MXCSR_MASK].copy_from_slice(&0xffffu32.to_le_bytes());
            region[HEADER_END - 64..HEADER_END].fill(0);
            region[XSTATE_BV].copy_from_slice(&xcr0.to_le_bytes());
            Self { xcr0, region, sets: 0 }
        }
    }

    impl ExtendedState for FakeState {
        fn xcr0(&mut self) -> Result<u64, String> {
            Ok(self.xcr0)
        }
        fn get(&mut self) -> Result<Box<Region>, String> {
            Ok(self.region.clone())
        }
        fn set(&mut self, region: &Region) -> Result<(), String> {
            self.region.copy_from_slice(region);
            self.sets += 1;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{amd_layout, FakeState};
    use super::*;
    use crate::emulate::tests::Flat;

    const ALL: u64 = u64::MAX;
    const AREA: u64 = 0x1000;
    const AVX_AREA: std::ops::Range<usize> = 576..832;
    const ZMM_AREA: std::ops::Range<usize> = 896..1408;

    fn req(op: Op, mask: u64) -> Request {
        Request { op, addr: AREA, mask, rex_w: true }
    }

    fn exec(r: Request, state: &mut FakeState, mem: &Flat) -> Option<Exception> {
        execute(&r, state, &amd_layout(), mem).unwrap()
    }

    fn area(mem: &Flat) -> Vec<u8> {
        mem.0.borrow()[AREA as usize..AREA as usize + 2432].to_vec()
    }

    fn set_header(mem: &Flat, at: usize, value: u64) {
        mem.0.borrow_mut()[AREA as usize + at..AREA as usize + at + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn save_then_restore_round_trips_every_component() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7);
        let original = cpu.region.clone();
        assert_eq!(exec(req(Op::Xsaveopt, ALL), &mut cpu, &mem), None);
        let saved = area(&mem);
        for r in [X87_CONTROL, MXCSR_AND_MASK, X87_REGISTERS, XMM_REGISTERS, AVX_AREA, 832..896, ZMM_AREA, 1408..2432] {
            assert_eq!(saved[r.clone()], original[r.clone()], "{r:?}");
        }
        assert!(saved[416..512].iter().all(|b| *b == 0), "reserved legacy bytes are not written");
        assert_eq!(read_u64(&saved, XSTATE_BV.start), 0xe7);
        // Another task's state, then restore ours.
        let components = [X87_CONTROL, X87_REGISTERS, XMM_REGISTERS, AVX_AREA, 832..896, ZMM_AREA, 1408..2432];
        for r in components.clone() {
            cpu.region[r].iter_mut().for_each(|b| *b = !*b);
        }
        assert_eq!(exec(req(Op::Xrstor, ALL), &mut cpu, &mem), None);
        assert!(cpu.region[..] == original[..], "restored state differs");
    }

    #[test]
    fn requested_features_are_xcr0_and_edx_eax() {
        let mem = Flat::new(0x4000);
        mem.0.borrow_mut().fill(0xaa);
        set_header(&mem, XSTATE_BV.start, 0);
        let mut cpu = FakeState::new(0x7); // XCR0 = x87 | SSE | AVX
                                           // EDX:EAX asks for SSE and the ZMM components, which XCR0 does not enable.
        assert_eq!(exec(req(Op::Xsave, SSE | 0xe0), &mut cpu, &mem), None);
        let saved = area(&mem);
        assert_eq!(saved[XMM_REGISTERS], cpu.region[XMM_REGISTERS]);
        assert_eq!(saved[MXCSR_AND_MASK], cpu.region[MXCSR_AND_MASK]);
        assert!(saved[X87_CONTROL].iter().all(|b| *b == 0xaa), "x87 not requested");
        assert!(saved[AVX_AREA].iter().all(|b| *b == 0xaa), "AVX not requested");
        assert!(saved[ZMM_AREA].iter().all(|b| *b == 0xaa), "ZMM not enabled in XCR0");
        assert_eq!(read_u64(&saved, XSTATE_BV.start), SSE);
    }

    #[test]
    fn xsave_sets_xstate_bv_from_xinuse_only_for_requested_bits() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7);
        // In use: x87 and ZMM_Hi256; memory claims AVX and opmask from an earlier save.
        cpu.region[XSTATE_BV].copy_from_slice(&(X87 | 0x40u64).to_le_bytes());
        set_header(&mem, XSTATE_BV.start, AVX | 0x20);
        assert_eq!(exec(req(Op::Xsave, X87 | AVX | 0x40), &mut cpu, &mem), None);
        // x87: saved, in use; AVX: requested, not in use -> cleared; opmask (0x20): not
        // requested -> kept; ZMM_Hi256 (0x40): in use -> set.
        assert_eq!(read_u64(&area(&mem), XSTATE_BV.start), X87 | 0x20 | 0x40);
    }

    #[test]
    fn xrstor_initialises_requested_components_missing_from_xstate_bv() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7);
        let before = cpu.region.clone();
        {
            let mut m = mem.0.borrow_mut();
            let a = AREA as usize;
            m[a..a + 2432].fill(0x55);
            m[a + 24..a + 28].copy_from_slice(&0x1f80u32.to_le_bytes());
            m[a + 512..a + 576].fill(0);
        }
        // XSTATE_BV = AVX only; RFBM = everything but opmask.
        set_header(&mem, XSTATE_BV.start, AVX);
        assert_eq!(exec(req(Op::Xrstor, !0x20), &mut cpu, &mem), None);
        let r = &cpu.region;
        assert_eq!(&r[..2], &0x037fu16.to_le_bytes(), "x87 initialised: FCW");
        assert!(r[2..24].iter().all(|b| *b == 0) && r[X87_REGISTERS].iter().all(|b| *b == 0));
        assert!(r[XMM_REGISTERS].iter().all(|b| *b == 0), "XMM initialised");
        assert!(r[AVX_AREA].iter().all(|b| *b == 0x55), "AVX loaded");
        assert_eq!(r[832..896], before[832..896], "opmask not requested: untouched");
        assert!(r[ZMM_AREA].iter().all(|b| *b == 0), "ZMM_Hi256 initialised");
        assert!(r[1408..2432].iter().all(|b| *b == 0), "Hi16_ZMM initialised");
        assert_eq!(read_u64(&r[..], XSTATE_BV.start), AVX | 0x20, "XINUSE: loaded + untouched");
    }

    #[test]
    fn xrstor_loads_mxcsr_for_avx_alone_and_keeps_it_in_use() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7);
        let before = cpu.region.clone();
        mem.0.borrow_mut()[AREA as usize + 24..AREA as usize + 28].copy_from_slice(&0x9fc0u32.to_le_bytes());
        assert_eq!(exec(req(Op::Xrstor, AVX), &mut cpu, &mem), None);
        assert_eq!(read_u32(&cpu.region[..], MXCSR.start), 0x9fc0);
        assert_eq!(cpu.region[XMM_REGISTERS], before[XMM_REGISTERS], "SSE not requested");
        assert_eq!(read_u64(&cpu.region[..], XSTATE_BV.start), 0xe7 & !AVX | SSE);
    }

    #[test]
    fn malformed_areas_raise_gp_and_change_nothing() {
        type Breakage = Box<dyn Fn(&Flat, &mut Request)>;
        let cases: [(&str, Breakage); 7] = [
            ("XSTATE_BV outside XCR0", Box::new(|m, _| set_header(m, XSTATE_BV.start, 1 << 9))),
            ("XCOMP_BV set", Box::new(|m, _| set_header(m, XCOMP_BV.start, 1))),
            ("compacted form", Box::new(|m, _| set_header(m, XCOMP_BV.start, (1 << 63) | 3))),
            ("reserved header bytes", Box::new(|m, _| set_header(m, 528, 1 << 40))),
            ("reserved MXCSR bits", Box::new(|m, _| m.0.borrow_mut()[AREA as usize + 26] = 0x01)),
            ("misaligned", Box::new(|_, r| r.addr = AREA + 32)),
            ("non-canonical", Box::new(|_, r| r.addr = 0x0000_7fff_ffff_fc00)),
        ];
        for (what, break_it) in cases {
            let mem = Flat::new(0x4000);
            mem.0.borrow_mut()[AREA as usize + 24..AREA as usize + 28].copy_from_slice(&0x1f80u32.to_le_bytes());
            let mut cpu = FakeState::new(0xe7);
            let before = cpu.region.clone();
            let mut r = req(Op::Xrstor, ALL);
            break_it(&mem, &mut r);
            assert_eq!(exec(r, &mut cpu, &mem), Some(Exception::GeneralProtection), "{what}");
            assert!(cpu.sets == 0 && cpu.region == before, "{what}: state changed");
        }
        // The reserved-MXCSR check applies only when MXCSR is loaded.
        let mem = Flat::new(0x4000);
        mem.0.borrow_mut()[AREA as usize + 26] = 0x01;
        assert_eq!(exec(req(Op::Xrstor, X87), &mut FakeState::new(0xe7), &mem), None);
    }

    #[test]
    fn unmapped_areas_raise_page_faults() {
        // The area runs past the end of the flat memory: XRSTOR faults before loading anything.
        let mem = Flat::new(AREA as usize + 2000);
        let mut cpu = FakeState::new(0xe7);
        let fault = exec(req(Op::Xrstor, ALL), &mut cpu, &mem);
        assert!(matches!(fault, Some(Exception::PageFault { .. })), "{fault:?}");
        assert_eq!(cpu.sets, 0);
        assert!(matches!(exec(req(Op::Xsave, ALL), &mut cpu, &mem), Some(Exception::PageFault { .. })));
        // Only x87/SSE requested: the 576-byte area fits.
        assert_eq!(exec(req(Op::Xsave, X87 | SSE), &mut cpu, &mem), None);
    }

    #[test]
    fn legacy_32bit_form_drops_fcs_and_fds() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7);
        let r = Request { rex_w: false, ..req(Op::Xsave, X87) };
        assert_eq!(exec(r, &mut cpu, &mem), None);
        let saved = area(&mem);
        assert_eq!(saved[8..12], cpu.region[8..12]);
        assert!(saved[FIP_HIGH].iter().chain(&saved[FDP_HIGH]).all(|b| *b == 0));
    }

    #[test]
    fn unknown_components_are_an_error_not_a_guess() {
        let mem = Flat::new(0x4000);
        let mut cpu = FakeState::new(0xe7 | 1 << 9); // PKRU enabled but absent from the layout
        let err = execute(&req(Op::Xsave, ALL), &mut cpu, &amd_layout(), &mem).unwrap_err();
        assert!(matches!(err, XsaveError::UnknownComponent(9)), "{err}");
    }

    #[test]
    fn layout_skips_supervisor_and_oversized_components() {
        let layout = Layout::from_cpuid(|i| match i {
            0 => (0x2e7, 0, 0x1000),
            2 => (256, 576, 0),
            8 => (16, 0, 1), // supervisor (not in EAX anyway)
            9 => (8, 4092, 0),
            _ => (0, 0, 0),
        });
        assert_eq!(layout.range(2), Some(576..832));
        assert_eq!(layout.range(8), None);
        assert_eq!(layout.range(9), None, "beyond the 4 KiB region");
        assert_eq!(layout.max_size(), 0x1000);
    }

    #[test]
    fn areas_crossing_pages_go_through_the_page_tables() {
        use crate::emulate::PagedMemory;
        use vm_memory::{Bytes, GuestAddress};
        let memory = crate::memory::create_guest_memory(64).unwrap();
        let w = |addr: u64, val: u64| memory.write_obj(val, GuestAddress(addr)).unwrap();
        // Virtual 0x40_0000.. maps page by page to 0x9000, 0x5000, 0x7000 (not contiguous).
        w(0x1000, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x3000 + 2 * 8, 0x4000 | 3);
        w(0x4000, 0x9000 | 3);
        w(0x4008, 0x5000 | 3);
        w(0x4010, 0x7000 | 3);
        let sregs =
            kvm_bindings::kvm_sregs { cr0: (1 << 31) | (1 << 16), efer: 1 << 10, cr3: 0x1000, ..Default::default() };
        let pm = PagedMemory { memory: &memory, sregs };
        let addr = 0x40_0000 + 0xc00; // 1 KiB before the first page boundary
        let mut cpu = FakeState::new(0xe7);
        let original = cpu.region.clone();
        let r = Request { op: Op::Xsave, addr, mask: ALL, rex_w: true };
        assert_eq!(execute(&r, &mut cpu, &amd_layout(), &pm).unwrap(), None);
        // Bytes 0..1024 land at 0x9c00, 1024..2432 at 0x5000.
        let mut first = [0u8; 1024];
        memory.read_slice(&mut first, GuestAddress(0x9c00)).unwrap();
        assert_eq!(first[..160], original[..160]);
        let mut second = vec![0u8; 2432 - 1024];
        memory.read_slice(&mut second, GuestAddress(0x5000)).unwrap();
        assert_eq!(second[..], original[1024..2432]);
        cpu.region.fill(0);
        cpu.region[MXCSR_MASK].copy_from_slice(&0xffffu32.to_le_bytes());
        let r = Request { op: Op::Xrstor, ..r };
        assert_eq!(execute(&r, &mut cpu, &amd_layout(), &pm).unwrap(), None);
        assert_eq!(cpu.region[..416], original[..416]);
        assert_eq!(cpu.region[576..2432], original[576..2432]);
        // A read-only second page makes XSAVE fault there, with the write bit in the code.
        w(0x4008, 0x5000 | 1);
        let r = Request { op: Op::Xsave, ..r };
        assert_eq!(
            execute(&r, &mut cpu, &amd_layout(), &pm).unwrap(),
            Some(Exception::PageFault { addr: 0x40_1000, error_code: 3 })
        );
    }
}
