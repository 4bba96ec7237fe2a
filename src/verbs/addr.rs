//! Socket addresses as the connection manager takes them (IPv4, IPv6, AF_IB).

use std::io;
use std::ptr;

/// A socket address as bytes plus length (IPv4/IPv6/AF_IB).
#[derive(Clone, Copy)]
pub struct SockAddr {
    /// Storage.
    pub storage: libc::sockaddr_storage,
    /// Meaningful length.
    pub len: libc::socklen_t,
}

impl std::fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SockAddr(family {}, len {})",
            self.storage.ss_family, self.len
        )
    }
}

impl From<std::net::SocketAddr> for SockAddr {
    fn from(a: std::net::SocketAddr) -> Self {
        // SAFETY: zeroed sockaddr_storage is valid; the sockaddr_in/in6 written fit inside it.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            std::net::SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: storage is larger than and suitably aligned for sockaddr_in.
                unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: storage is larger than and suitably aligned for sockaddr_in6.
                unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

impl SockAddr {
    /// The address as a std one, for IPv4/IPv6.
    pub fn to_std(&self) -> Option<std::net::SocketAddr> {
        match self.family() {
            libc::AF_INET => {
                // SAFETY: family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in) };
                Some(std::net::SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in6) };
                Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address rdma_cm understands;
    /// anything else unchanged.
    pub fn unmap_v4(&self) -> SockAddr {
        match self.to_std() {
            Some(std::net::SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => std::net::SocketAddr::from((v4, v6.port())).into(),
                None => *self,
            },
            _ => *self,
        }
    }

    /// An IPv4 address as IPv4-mapped IPv6, the way an AF_INET6 socket reports it.
    pub fn map_v4(&self) -> SockAddr {
        match self.to_std() {
            Some(std::net::SocketAddr::V4(v4)) => {
                std::net::SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())).into()
            }
            _ => *self,
        }
    }

    /// Copies a caller's address after checking its length against its family.
    ///
    /// # Safety
    /// `addr` must point to `len` readable bytes.
    pub unsafe fn from_raw(addr: *const libc::sockaddr, len: libc::socklen_t) -> io::Result<Self> {
        if addr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let len_us = len as usize;
        if len_us < std::mem::size_of::<libc::sa_family_t>()
            || len_us > std::mem::size_of::<libc::sockaddr_storage>()
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: zeroed storage is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: caller guarantees len readable bytes; storage is larger (checked above).
        unsafe {
            ptr::copy_nonoverlapping(addr as *const u8, &mut storage as *mut _ as *mut u8, len_us)
        };
        let need = match storage.ss_family as i32 {
            libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
            libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
            libc::AF_IB => len_us,
            _ => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        };
        if len_us < need {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(SockAddr { storage, len })
    }

    pub(super) fn from_storage(storage: libc::sockaddr_storage) -> Self {
        let len = match storage.ss_family as i32 {
            libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
            libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
            _ => std::mem::size_of::<libc::sockaddr_storage>(),
        } as libc::socklen_t;
        SockAddr { storage, len }
    }

    /// Address family.
    pub fn family(&self) -> i32 {
        self.storage.ss_family as i32
    }

    pub(super) fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        &mut self.storage as *mut _ as *mut libc::sockaddr
    }

    /// Copies into a caller's buffer with socket semantics (truncate, report full length).
    ///
    /// # Safety
    /// `addr` must point to `*addrlen` writable bytes and `addrlen` must be valid.
    pub unsafe fn copy_out(&self, addr: *mut libc::sockaddr, addrlen: *mut libc::socklen_t) {
        if addr.is_null() || addrlen.is_null() {
            return;
        }
        // SAFETY: caller guarantees both pointers.
        unsafe {
            let n = (*addrlen).min(self.len) as usize;
            ptr::copy_nonoverlapping(&self.storage as *const _ as *const u8, addr as *mut u8, n);
            *addrlen = self.len;
        }
    }
}
