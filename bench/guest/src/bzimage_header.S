/* The setup sectors of the bench guest's bzImage: Linux's setup header
 * (Documentation/arch/x86/boot.rst, protocol 2.15), and nothing else. The
 * guest has no real-mode or 32-bit code; it is meant for loaders that use
 * the 64-bit entry, 0x200 into the protected-mode image, as the vmm does.
 * build.sh assembles this with the image's sizes and puts the flat image
 * (the ELF's loadable bytes from 1 MiB on) right after these two sectors.
 *
 * Symbols from build.sh (--defsym):
 *   SYSSIZE    the protected-mode image, in 16-byte paragraphs
 *   INIT_SIZE  bytes from the load address the guest needs (its .bss too) */

.set SETUP_SECTS, 1             /* one sector after the boot sector */
.set LOAD_ADDR, 0x100000
.set LOADED_HIGH, 0x01          /* loadflags: the image goes at 1 MiB */
.set XLF_KERNEL_64, 0x01        /* xloadflags: the 64-bit entry exists */

.code16
.section .text
setup_start:
    /* A BIOS or a loader that runs the boot sector finds nothing to run. */
    cli
1:  hlt
    jmp 1b

.org 0x1f1
    .byte SETUP_SECTS           /* setup_sects */
    .word 0                     /* root_flags */
    .long SYSSIZE               /* syssize */
    .word 0                     /* ram_size */
    .word 0                     /* vid_mode */
    .word 0                     /* root_dev */
    .word 0xaa55                /* boot_flag */
    /* 0x200: the real-mode entry would be here; it spins in place. */
    .byte 0xeb, 0xfe            /* jump: jmp . (2 bytes) */
    .ascii "HdrS"               /* header */
    .word 0x020f                /* version 2.15 */
    .long 0                     /* realmode_swtch */
    .word 0                     /* start_sys_seg */
    .word version - setup_start - 0x200 /* kernel_version */
    .byte 0                     /* type_of_loader: the loader's to fill */
    .byte LOADED_HIGH           /* loadflags */
    .word 0                     /* setup_move_size */
    .long LOAD_ADDR             /* code32_start */
    .long 0                     /* ramdisk_image: the loader's */
    .long 0                     /* ramdisk_size: the loader's */
    .long 0                     /* bootsect_kludge */
    .word 0                     /* heap_end_ptr */
    .byte 0                     /* ext_loader_ver */
    .byte 0                     /* ext_loader_type */
    .long 0                     /* cmd_line_ptr: the loader's */
    .long 0x7fffffff            /* initrd_addr_max */
    .long 0x1000                /* kernel_alignment */
    .byte 0                     /* relocatable_kernel: it runs where it is linked */
    .byte 12                    /* min_alignment: 4 KiB */
    .word XLF_KERNEL_64         /* xloadflags */
    .long 4095                  /* cmdline_size */
    .long 0                     /* hardware_subarch: a normal PC */
    .quad 0                     /* hardware_subarch_data */
    .long 0                     /* payload_offset: not compressed */
    .long 0                     /* payload_length */
    .quad 0                     /* setup_data */
    .quad LOAD_ADDR             /* pref_address */
    .long INIT_SIZE             /* init_size */
    .long 0                     /* handover_offset: no EFI */
    .long 0                     /* kernel_info_offset */

version:
    .asciz "bench-guest (bzImage, 64-bit boot protocol only)"

.org (SETUP_SECTS + 1) * 512
