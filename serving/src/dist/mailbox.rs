//! Per-rank inboxes: one FIFO queue per (source rank, tag), plus the poison that fails every
//! pending and future operation once the group is broken or shut down.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::{CommError, Tag};

/// Why a mailbox stopped working. The first poison wins; later ones are ignored.
#[derive(Debug, Clone)]
pub(crate) enum Poison {
    /// A peer process went away (or broke the protocol): the group must restart.
    Lost {
        rank: usize,
        addr: String,
        reason: String,
    },
    /// This process stopped its communicator on purpose.
    Shutdown,
}

impl Poison {
    pub(crate) fn to_error(&self) -> CommError {
        match self {
            Poison::Lost { rank, addr, reason } => CommError::PeerLost {
                rank: *rank,
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Poison::Shutdown => CommError::Shutdown,
        }
    }
}

#[derive(Default)]
struct Inbox {
    queues: HashMap<(usize, Tag), VecDeque<Vec<u8>>>,
    poison: Option<Poison>,
}

struct Slot {
    inbox: Mutex<Inbox>,
    ready: Condvar,
}

/// The inboxes of the consecutive ranks `first .. first + count` hosted by one process.
pub(crate) struct Mailbox {
    first: usize,
    slots: Vec<Slot>,
    poison: Mutex<Option<Poison>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("first", &self.first)
            .field("ranks", &self.slots.len())
            .field("poison", &*lock(&self.poison))
            .finish()
    }
}

/// Locks a mutex, ignoring std's lock poisoning: every critical section here leaves the data
/// consistent, so a panic elsewhere must not turn into a second panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mailbox {
    /// Inboxes for ranks `first .. first + count`.
    pub(crate) fn new(first: usize, count: usize) -> Self {
        let slots = (0..count)
            .map(|_| Slot {
                inbox: Mutex::new(Inbox::default()),
                ready: Condvar::new(),
            })
            .collect();
        Self {
            first,
            slots,
            poison: Mutex::new(None),
        }
    }

    /// Whether `rank` has an inbox here.
    pub(crate) fn hosts(&self, rank: usize) -> bool {
        rank >= self.first && rank - self.first < self.slots.len()
    }

    fn slot(&self, rank: usize) -> Result<&Slot, CommError> {
        if !self.hosts(rank) {
            return Err(CommError::InvalidArgument(format!(
                "rank {rank} is not hosted by this process (it hosts ranks {}..{})",
                self.first,
                self.first + self.slots.len()
            )));
        }
        Ok(&self.slots[rank - self.first])
    }

    /// The error every operation returns once poisoned.
    pub(crate) fn poisoned(&self) -> Option<CommError> {
        lock(&self.poison).as_ref().map(Poison::to_error)
    }

    /// Queues `data` for rank `dst`, as sent by `src` with `tag`.
    pub(crate) fn deliver(
        &self,
        dst: usize,
        src: usize,
        tag: Tag,
        data: Vec<u8>,
    ) -> Result<(), CommError> {
        let slot = self.slot(dst)?;
        let mut inbox = lock(&slot.inbox);
        if let Some(p) = &inbox.poison {
            return Err(p.to_error());
        }
        inbox.queues.entry((src, tag)).or_default().push_back(data);
        drop(inbox);
        slot.ready.notify_all();
        Ok(())
    }

    /// Blocks until rank `dst` has a message from `src` with `tag`, or the mailbox is poisoned
    /// and no such message is left.
    pub(crate) fn take(&self, dst: usize, src: usize, tag: Tag) -> Result<Vec<u8>, CommError> {
        let slot = self.slot(dst)?;
        let mut inbox = lock(&slot.inbox);
        loop {
            // Messages that arrived before the poison are still handed out, in order.
            if let Some(msg) = inbox
                .queues
                .get_mut(&(src, tag))
                .and_then(VecDeque::pop_front)
            {
                return Ok(msg);
            }
            if let Some(p) = &inbox.poison {
                return Err(p.to_error());
            }
            inbox = slot
                .ready
                .wait(inbox)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Fails every pending and future operation with `poison` (a `take` still gets the messages
    /// that were already queued). Returns true when this call
    /// poisoned the mailbox, false when it already was.
    pub(crate) fn poison(&self, poison: Poison) -> bool {
        {
            let mut current = lock(&self.poison);
            if current.is_some() {
                return false;
            }
            *current = Some(poison.clone());
        }
        for slot in &self.slots {
            let mut inbox = lock(&slot.inbox);
            inbox.poison = Some(poison.clone());
            drop(inbox);
            slot.ready.notify_all();
        }
        true
    }
}
