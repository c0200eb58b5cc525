/* Entries of the bench guest: PVH (_start32, named by the ELF note) and the
 * Linux 64-bit boot protocol (startup_64, 0x200 into the image, for the
 * bzImage build). Everything at CPL0 is emulated one instruction at a time
 * on PVM hosts (about 0.7 us each), so this does the least it can: the GDT,
 * IDT, TSS and page tables are static data, and the code below only loads
 * them, turns on long mode, SSE and the LAPIC, arms kvmclock when KVM
 * offers it, and drops to CPL3 with IOPL=3. */

.set KCODE, 0x08
.set KDATA, 0x10
.set UDATA, 0x18 | 3
.set UCODE, 0x20 | 3
.set TSSSEL, 0x28
.set TSS_ADDR, 0x101000
.set STUBS_ADDR, 0x104000

/* ---- the image's first page: the Linux 64-bit entry ---- */
.section .boot.entry, "ax"
.code64
/* The 64-bit boot protocol enters at the load address + 0x200 in long
 * mode, on the loader's GDT and identity map, with %rsi pointing at the
 * zero page. The bench guest's own tables take over at once. Nothing here
 * serves the 32-bit or real-mode entries: the bzImage header says so
 * (XLF_KERNEL_64 only), and a loader that jumps to 0 anyway faults. */
    ud2
.org 0x200
.global startup_64
startup_64:
    cli
    mov %rsi, linux_boot_params
    mov $kstack_top, %rsp       /* the protocol gives no stack */
    lgdt gdt_ptr64
    mov $pml4, %eax
    mov %rax, %cr3
    mov %cr4, %rax
    or $(1 << 5) | (1 << 9) | (1 << 10), %rax   /* PAE, OSFXSR, OSXMMEXCPT */
    mov %rax, %cr4
    mov %cr0, %rax
    and $~(1 << 2), %rax        /* no x87 emulation: SSE on */
    or $(1 << 1), %rax          /* MP */
    mov %rax, %cr0
    push $KCODE                 /* onto this GDT's code segment */
    push $start64
    lretq

/* ---- TSS, at the fixed address 0x101000 ---- */
.section .boot.tss, "aw"
.global boot_tss
boot_tss:
    .long 0
    .quad kstack_top            /* RSP0: where interrupts from CPL3 land */
    .fill 92, 1, 0
    .word 0
    .word 104                   /* the I/O bitmap follows */
    /* Every port allowed. IOPL=3 should be enough, but PVM checks the
     * bitmap and ignores IOPL for CPL3 port I/O. */
    .fill 8192, 1, 0
    .byte 0xff

/* ---- interrupt stubs, 16 bytes each, at 0x104000 ---- */
.section .boot.stubs, "ax"
.code64
.set vec, 0
.rept 256
    .balign 16
    /* Exceptions 8, 10-14, 17, 21, 29, 30 push an error code; the rest get a 0. */
    .if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp isr_common
    .set vec, vec + 1
.endr

.section .text.boot, "ax"
.code32
.global _start32
_start32:
    cli
    mov %ebx, pvh_start_info    /* hvm_start_info, from the loader */
    lgdt gdt_ptr32
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5) | (1 << 9) | (1 << 10), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xC0000080, %ecx       /* EFER.LME */
    rdmsr
    or $(1 << 8), %eax
    wrmsr
    mov %cr0, %eax
    and $~(1 << 2), %eax        /* no x87 emulation: SSE on */
    or $(1 << 31) | (1 << 1) | 1, %eax   /* PG, MP, PE */
    mov %eax, %cr0
    ljmp $KCODE, $start64

.code64
start64:
    mov $KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $kstack_top, %rsp
    lidt idt_ptr
    mov $TSSSEL, %ax
    ltr %ax
    /* Legacy PICs masked: firmware maps them onto vectors 8-15. */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    /* LAPIC on (software enable, spurious vector 0xff). */
    mov $0xfee000f0, %edi
    movl $0x1ff, (%rdi)
    /* kvmclock, if the hypervisor is KVM and offers it: gives the TSC rate. */
    mov $0x40000000, %eax
    cpuid
    cmp $0x4b4d564b, %ebx       /* "KVMK" */
    jne 1f
    mov $0x40000001, %eax
    cpuid
    test $(1 << 3), %eax        /* KVM_FEATURE_CLOCKSOURCE2 */
    jz 1f
    mov $0x4b564d01, %ecx       /* MSR_KVM_SYSTEM_TIME_NEW */
    mov $pvclock, %eax
    or $1, %eax
    xor %edx, %edx
    wrmsr
    movb $1, pvclock_armed
1:
    /* To CPL3 with IOPL=3 and interrupts on. */
    mov $UDATA, %rax
    push %rax
    mov $ustack_top - 8, %rax   /* as after a call: the ABI's alignment */
    push %rax
    push $0x3202
    push $UCODE
    mov $guest_main, %rax
    push %rax
    iretq

/* Interrupts: vector >= 32 counts and EOIs; an exception reports and exits. */
isr_common:
    push %rax
    mov 8(%rsp), %rax
    cmpb $0, halt_requested     /* rt::halt_forever: at rest for good */
    jne 4f
    cmp $32, %rax
    jae 7f
    cmp $6, %rax
    jne 2f
    cmpb $0, wait_requested
    jne 5f
    jmp 2f
7:  lock incq irq_counts(, %rax, 8)
    lock incq irq_total
    mov $0xfee000b0, %eax
    movl $0, (%rax)             /* EOI */
1:  pop %rax
    add $16, %rsp
    iretq
5:  /* rt::wait_for_interrupt: the #UD it raised (interrupts off here, by
     * the gate). Back past its ud2 in any case; halt only if no interrupt
     * came since the caller looked (no lost wake-up: an interrupt after
     * this check is pending at the hlt, which sti's shadow reaches). */
    movb $0, wait_requested
    addq $2, 24(%rsp)
    mov irq_total, %rax
    cmp wait_seen, %rax
    jne 1b
    push %rdx
    mov $0xfee00000, %eax
    cmpb $0, apic_timer_ready   /* the LAPIC timer: one-shot, 1 count/ns */
    jne 6f
    movl $0xb, 0x3e0(%rax)      /* divide by 1 */
    movl $0xfd, 0x320(%rax)     /* one-shot, vector 0xfd */
    movb $1, apic_timer_ready
6:  mov wait_timer_ns, %edx     /* a wake-up for the caller's deadlines */
    mov %edx, 0x380(%rax)
    pop %rdx
    incq halt_count
    sti
    hlt
    cli
    jmp 1b
2:
    mov %rax, fault_info
    mov 16(%rsp), %rax
    mov %rax, fault_info + 8    /* error code */
    mov 24(%rsp), %rax
    mov %rax, fault_info + 16   /* rip */
    mov %cr2, %rax
    mov %rax, fault_info + 24
    and $~15, %rsp
    call guest_fault
3:  hlt
    jmp 3b
4:  cli                         /* nothing wakes it: the VMM ends the VM */
    hlt
    jmp 4b

.section .data
.balign 8
.global pvh_start_info
pvh_start_info: .quad 0
.global linux_boot_params
linux_boot_params: .quad 0
.global pvclock_armed
pvclock_armed: .byte 0
.global halt_requested
halt_requested: .byte 0
.global wait_requested
wait_requested: .byte 0
apic_timer_ready: .byte 0
.balign 8
.global wait_seen
wait_seen: .quad 0
.global wait_timer_ns
wait_timer_ns: .quad 0
.global irq_total
irq_total: .quad 0
.global halt_count
halt_count: .quad 0

.balign 16
gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF    /* 0x08 kernel code, 64-bit (accessed) */
    .quad 0x00CF93000000FFFF    /* 0x10 kernel data */
    .quad 0x00CFF3000000FFFF    /* 0x18 user data, DPL3 */
    .quad 0x00AFFB000000FFFF    /* 0x20 user code, 64-bit, DPL3 */
    .quad 0x0000891010002068    /* 0x28 TSS at 0x101000, limit 104 + 8192 */
    .quad 0
gdt_end:
gdt_ptr32:
    .word gdt_end - gdt - 1
    .long gdt
.balign 8
gdt_ptr64:
    .word gdt_end - gdt - 1
    .quad gdt

.balign 16
idt:
.set vec, 0
.rept 256
    .word (STUBS_ADDR + vec * 16) & 0xffff
    .word KCODE
    .byte 0
    .byte 0x8e                  /* present, DPL0, interrupt gate */
    .word ((STUBS_ADDR + vec * 16) >> 16) & 0xffff
    .long 0
    .long 0
    .set vec, vec + 1
.endr
idt_end:
.balign 8
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

/* Identity map with user access everywhere: 2 MiB pages below 4 GiB,
 * 1 GiB pages from 4 GiB to 512 GiB (where 64-bit BARs live). */
.balign 4096
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 7
    .quad pd1 + 7
    .quad pd2 + 7
    .quad pd3 + 7
.set i, 4
.rept 508
    .quad (i << 30) | 0x87
    .set i, i + 1
.endr
.irp n, 0, 1, 2, 3
pd\n:
.set i, 0
.rept 512
    .quad ((\n << 30) + (i << 21)) | 0x87
    .set i, i + 1
.endr
.endr

.balign 4096
.global pvclock
pvclock: .fill 64, 1, 0

.section .note.Xen, "a"
.balign 4
    .long 4                     /* name size */
    .long 4                     /* desc size */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32

.section .bss
.balign 4096
kstack: .skip 16384
kstack_top:
.balign 16
.global irq_counts
irq_counts: .skip 256 * 8
.global fault_info
fault_info: .skip 32
.balign 4096
ustack: .skip 262144
ustack_top:
