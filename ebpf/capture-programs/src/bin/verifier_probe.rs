//! A program the verifier must refuse (it reads the packet without checking
//! where the packet ends). Embedded only with the `capture/testing` feature,
//! to test that a rejected program is reported with the verifier's log.
#![no_std]
#![no_main]

use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;

#[classifier]
pub fn unchecked_read(ctx: TcContext) -> i32 {
    let data = ctx.data() as *const u8;
    // SAFETY: not safe at all, which is the point: the verifier rejects the
    // program before it can ever run.
    i32::from(unsafe { core::ptr::read_volatile(data.add(20)) })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
