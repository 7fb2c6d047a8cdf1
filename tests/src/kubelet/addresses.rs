//! Loopback addresses for nodes and pods.
//!
//! Processes share the host's network, so each pod gets its own address in `127.0.0.0/8` (all of
//! it reaches the loopback interface on Linux) and binds its ports there. An address is held by
//! an exclusive `flock` on `<lock dir>/<address>`: the lock directory is shared by every kubelet
//! of the machine (tests run several at once), and the kernel drops the lock when the kubelet
//! dies, so an address is never handed out twice while in use and never leaks.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Mutex,
};

use nix::fcntl::{Flock, FlockArg};

use super::KubeletError;

/// Hands out loopback addresses from `first` upwards, skipping `.0` and `.255`.
#[derive(Debug)]
pub struct AddressPool {
    dir: PathBuf,
    first: u32,
    inner: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    next: u32,
    held: HashMap<Ipv4Addr, Flock<File>>,
}

const LAST: u32 = u32::from_be_bytes([127, 255, 255, 254]);
/// Candidates tried before giving up.
const MAX_TRIES: u32 = 4096;

impl AddressPool {
    /// A pool whose locks live in `dir` (created if missing).
    pub fn new(dir: PathBuf, first: Ipv4Addr) -> Result<Self, KubeletError> {
        if first.octets()[0] != 127 {
            return Err(KubeletError::Config(format!(
                "the first pod address {first} is not a loopback address"
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| KubeletError::io("creating the address lock directory", &dir, e))?;
        let first = u32::from(first);
        Ok(Self {
            dir,
            first,
            inner: Mutex::new(PoolState {
                next: first,
                held: HashMap::new(),
            }),
        })
    }

    /// Takes an address: `preferred` when it is free (a pod keeps its address across kubelet
    /// restarts), otherwise the next free one after the last handed out.
    pub fn allocate(&self, preferred: Option<Ipv4Addr>) -> Result<Ipv4Addr, KubeletError> {
        let mut state = self.inner.lock().expect("address pool lock");
        if let Some(ip) = preferred.filter(|ip| self.in_range(u32::from(*ip))) {
            if let std::collections::hash_map::Entry::Vacant(slot) = state.held.entry(ip) {
                if let Some(lock) = self.try_lock(ip)? {
                    slot.insert(lock);
                    return Ok(ip);
                }
            }
        }
        let mut candidate = state.next;
        for _ in 0..MAX_TRIES {
            let ip = Ipv4Addr::from(candidate);
            candidate = self.after(candidate);
            if !usable(ip) || state.held.contains_key(&ip) {
                continue;
            }
            if let Some(lock) = self.try_lock(ip)? {
                state.held.insert(ip, lock);
                state.next = candidate;
                return Ok(ip);
            }
        }
        Err(KubeletError::Addresses(format!(
            "tried {MAX_TRIES} addresses from {}; every one is held (see {})",
            Ipv4Addr::from(state.next),
            self.dir.display()
        )))
    }

    /// Gives an address back.
    pub fn release(&self, ip: Ipv4Addr) {
        let mut state = self.inner.lock().expect("address pool lock");
        if let Some(lock) = state.held.remove(&ip) {
            // Remove the file while still holding the lock, so that a racing kubelet that
            // opened it before the removal fails over to a fresh file.
            let _ = std::fs::remove_file(self.lock_path(ip));
            drop(lock);
        }
    }

    fn in_range(&self, ip: u32) -> bool {
        ip >= self.first && ip <= LAST && usable(Ipv4Addr::from(ip))
    }

    fn after(&self, ip: u32) -> u32 {
        if ip >= LAST {
            self.first
        } else {
            ip + 1
        }
    }

    fn lock_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn try_lock(&self, ip: Ipv4Addr) -> Result<Option<Flock<File>>, KubeletError> {
        let path = self.lock_path(ip);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| KubeletError::io("opening an address lock", &path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                // The file may have been removed (and maybe created anew) by its previous
                // holder between our open and our lock; then this lock guards nothing.
                let ours = lock.metadata().map(|m| (m.dev(), m.ino())).ok();
                let current = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
                if ours.is_none() || ours != current {
                    return Ok(None);
                }
                Ok(Some(lock))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(KubeletError::io(
                "locking an address",
                path,
                std::io::Error::from(errno),
            )),
        }
    }
}

fn usable(ip: Ipv4Addr) -> bool {
    let last = ip.octets()[3];
    last != 0 && last != 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_across_pools_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = AddressPool::new(dir.path().into(), Ipv4Addr::new(127, 0, 0, 253)).unwrap();
        let b = AddressPool::new(dir.path().into(), Ipv4Addr::new(127, 0, 0, 253)).unwrap();
        let first = a.allocate(None).unwrap();
        assert_eq!(first, Ipv4Addr::new(127, 0, 0, 253));
        // Another kubelet skips the held address, and .255/.0.
        assert_eq!(b.allocate(None).unwrap(), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(b.allocate(None).unwrap(), Ipv4Addr::new(127, 0, 1, 1));
        // A preferred address that is held is not given.
        assert_ne!(b.allocate(Some(first)).unwrap(), first);
        a.release(first);
        assert_eq!(b.allocate(Some(first)).unwrap(), first);
    }
}
