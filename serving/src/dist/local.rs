//! The in-process communicator: every rank is a thread of this process.

use std::sync::Arc;

use super::mailbox::{Mailbox, Poison};
use super::{CommError, Communicator, Tag};

/// One rank of a group whose ranks all live in this process; messages go through in-memory
/// queues. Made by [`super::local_group`].
#[derive(Debug)]
pub struct LocalComm {
    rank: usize,
    world: usize,
    mailbox: Arc<Mailbox>,
}

impl LocalComm {
    /// One endpoint per rank of an in-process group of `world` ranks.
    pub fn group(world: usize) -> Vec<LocalComm> {
        let mailbox = Arc::new(Mailbox::new(0, world));
        (0..world)
            .map(|rank| LocalComm {
                rank,
                world,
                mailbox: mailbox.clone(),
            })
            .collect()
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&self, to: usize, tag: Tag, data: &[u8]) -> Result<(), CommError> {
        if to >= self.world {
            return Err(CommError::InvalidArgument(format!(
                "send to rank {to}, but the world has {} ranks",
                self.world
            )));
        }
        self.mailbox.deliver(to, self.rank, tag, data.to_vec())
    }

    fn recv(&self, from: usize, tag: Tag) -> Result<Vec<u8>, CommError> {
        if from >= self.world {
            return Err(CommError::InvalidArgument(format!(
                "recv from rank {from}, but the world has {} ranks",
                self.world
            )));
        }
        self.mailbox.take(self.rank, from, tag)
    }

    /// Fails pending and future operations on every rank of the group.
    fn shutdown(&self) {
        self.mailbox.poison(Poison::Shutdown);
    }
}
