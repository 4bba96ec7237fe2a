//! errno: the one place where core errors become C error numbers.

use rsocket::Error;

/// Sets the calling thread's errno.
pub fn set_raw(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Sets errno from a core error (the mapping table is `Error::errno`).
pub fn set(e: &Error) {
    set_raw(e.errno());
}
