//! The vmm's two boot protocols, proven in seconds on any machine: the
//! bench guest is built both as a PVH ELF and as a bzImage (a Linux setup
//! header in front of the same bytes, entered through the 64-bit boot
//! protocol), and reports what its loader handed over. A stock Linux
//! bzImage would prove the same only after minutes of its decompressor
//! under PVM's emulated CPL0 (tests/tests/vmm_linux.rs).

use std::path::Path;

use test_infra::{bin, build_guest, ready, s, Fixture, GuestRun, Kernel, VmmVm};

const MIB: u64 = 1 << 20;

/// Boots `kernel` with `mode=boot` and an initrd; returns the run.
fn boot(kernel: Kernel, initrd: &Path, mem_mib: u32, cmdline: &str) -> GuestRun {
    let vm = VmmVm {
        kernel,
        initrd: Some(initrd.to_path_buf()),
        mem_mib,
        ..VmmVm::new(&bin("vmm"), cmdline)
    };
    let r = vm.run().expect("the vmm runs");
    r.assert_ok("mode=boot");
    r
}

#[test]
fn both_boot_protocols_hand_the_guest_its_command_line_memory_map_initrd_and_rsdp() {
    if !ready("vmm_boot_protocols", &[]) {
        return;
    }
    let fx = Fixture::new();
    // An initrd of an odd size with content a lost or shifted byte would show.
    let initrd = fx.path("initrd.bin");
    let data: Vec<u8> = (0..(3 * MIB + 517))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&initrd, &data).expect("initrd");
    let crc = crc32c::crc32c(&data) as u64;
    let mem_mib = 320u32;
    let ram = mem_mib as u64 * MIB;
    let mut seen = Vec::new();
    for (kernel, protocol) in [(Kernel::BenchElf, "pvh"), (Kernel::BenchBzImage, "linux64")] {
        // (A timeout of its own: the test infrastructure adds none then.)
        let cmdline = format!(
            "mode=boot seed={} tsc_khz=1000000 timeout_ms=5000",
            4242 + seen.len()
        );
        let r = boot(kernel, &initrd, mem_mib, &cmdline);
        let b = r.boot_info.as_ref().expect("a boot report");
        let what = format!("{protocol}: {b}");
        assert_eq!(b["protocol"], protocol, "{what}");
        assert_eq!(b["cmdline"], cmdline.as_str(), "{what}");
        // Low RAM below the EBDA, RAM from 1 MiB to the end, the ECAM window.
        let e820: Vec<Vec<u64>> = serde_json::from_value(b["e820"].clone()).expect("e820");
        assert_eq!(
            e820,
            vec![
                vec![0, 0x9fc00, 1],
                vec![MIB, ram - MIB, 1],
                vec![0xe000_0000, MIB, 2]
            ],
            "{what}"
        );
        let i = &b["initrd"];
        let (at, size) = (
            i["addr"].as_u64().expect("addr"),
            i["size"].as_u64().expect("size"),
        );
        assert_eq!(size, data.len() as u64, "{what}");
        assert_eq!(
            i["crc32c"].as_u64(),
            Some(crc),
            "the initrd's bytes: {what}"
        );
        assert_eq!(at % 4096, 0, "{what}");
        let image_end = b["image_end"].as_u64().expect("image_end");
        assert!(at >= image_end && at + size <= ram, "{what}");
        let rsdp = b["rsdp"].as_u64().expect("rsdp");
        assert!(rsdp != 0 && rsdp < MIB, "{what}");
        seen.push((rsdp, at));
    }
    // The same machine either way.
    assert_eq!(seen[0], seen[1], "PVH and bzImage boots differ");
}

#[test]
fn the_bzimage_runs_a_verifying_workload_on_a_blk_backend_disk() {
    if !ready("vmm_bzimage_workload", &[]) {
        return;
    }
    let fx = Fixture::new();
    let vm_img = fx.base_and_clone("256M");
    let b = fx.serve(&vm_img, 2);
    let sock = Fixture::socket_of(&vm_img);
    for (gen, (cpus, irq)) in [(1u8, true), (2, false)].into_iter().enumerate() {
        let base = format!("bs=16k qd=16 queues=2 irq={} size=64M", irq as u8);
        let vm = |cmdline: String| VmmVm {
            kernel: Kernel::BenchBzImage,
            cpus,
            ..VmmVm::new(&bin("vmm"), &cmdline).with_disk(&sock, 2)
        };
        let w = vm(format!("mode=write verify=1 gen={} {base}", gen + 1))
            .run()
            .expect("vmm runs");
        w.assert_ok(&format!("bzImage write, {cpus} vCPUs, irq {irq}"));
        assert_eq!(w.field("writes"), 64 * MIB / 16384);
        let r = vm(format!("mode=read verify=1 expect_gen={} {base}", gen + 1))
            .run()
            .expect("vmm runs");
        r.assert_ok(&format!("bzImage read, {cpus} vCPUs, irq {irq}"));
        assert_eq!(
            r.boot_info.as_ref().map(|b| b["protocol"].clone()),
            Some("linux64".into())
        );
        if irq {
            assert!(r.field("irqs") > 0, "MSI-X interrupts arrived");
        }
    }
    b.stop();
}

/// A bzImage that has no 64-bit entry point (its xloadflags say so) is
/// refused by name rather than entered at an address holding anything.
#[test]
fn a_bzimage_without_a_64_bit_entry_is_refused() {
    if !ready("vmm_bzimage_no_64_bit_entry", &[]) {
        return;
    }
    let fx = Fixture::new();
    let mut image = std::fs::read(build_guest().expect("bench guest").bzimage).expect("bzImage");
    image[0x236] = 0; // xloadflags: no XLF_KERNEL_64
    let kernel = fx.path("old.bzImage");
    std::fs::write(&kernel, image).expect("write");
    let out = std::process::Command::new(bin("vmm"))
        .args(["--kernel", &s(&kernel), "--memory", "64M"])
        .output()
        .expect("vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no 64-bit entry point"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
