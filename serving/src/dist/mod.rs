//! Communication between the ranks of a tensor × pipeline parallel group.
//!
//! # Layout
//!
//! Ranks are numbered `0..world`. A *process* hosts one or more consecutive ranks, each driven by
//! its own thread. `--peers` lists every process's `HOST:PORT` in process order, this process's
//! own entry included; process `p` hosts ranks `p * rpp .. (p + 1) * rpp`, where
//! `rpp = world / peers.len()` (ranks per process). Three layouts are supported:
//!
//! - every rank in one process: [`local_group`] (or [`join_tcp`] with a single peer), no sockets;
//! - one rank per process, over TCP: [`join_tcp`];
//! - several ranks per process, over TCP: ranks of the same process exchange messages through
//!   in-memory queues, ranks of different processes through the TCP connection between them.
//!
//! Every endpoint implements [`Communicator`]: buffered point-to-point messages, FIFO per
//! (source rank, [`Tag`]), and ring collectives built on them. With the `cuda` feature,
//! `NcclComm` runs the collectives through NCCL on the GPU instead.
//!
//! # Wire format (TCP)
//!
//! There is one TCP connection per pair of processes: the process with the higher index connects
//! to the one with the lower index and listens on the port of its own `--peers` entry, on all
//! interfaces. All integers are little-endian.
//!
//! Handshake, once per connection:
//! - the connecting process sends a *hello* (28 bytes): magic `b"LLMODIST"`, protocol version
//!   `u32`, its process index `u32`, world size `u32`, number of processes `u32`, and the process
//!   index it believes it reached `u32`;
//! - the accepting process answers with a *welcome*: magic, version `u32`, its process index
//!   `u32`, world `u32`, processes `u32`, status `u8` (0 accepted, 1 layout mismatch, 2 protocol
//!   mismatch), then a reason of `u32` length and UTF-8 bytes (empty when accepted).
//!
//! A mismatched layout or version fails `join_tcp` on both sides with a [`CommError::Layout`] or
//! [`CommError::Protocol`] that says what differs; a connection that does not start with the magic
//! is logged and dropped, and the join goes on.
//!
//! Then frames, in both directions: a 17-byte header — source rank `u32`, destination rank `u32`,
//! tag `u8` (0 control, 1 activation, 2 logits, 3 collective), payload length `u64` (at most
//! [`MAX_FRAME_BYTES`]) — followed by the payload. Tag 255 is an *abort notice*: the sending
//! process saw the group break (payload: address length `u32`, address, reason) and closes the
//! connection next, so that every process reports the same lost rank.
//!
//! # Failures
//!
//! Any broken connection (EOF, reset, read error, malformed frame) poisons the whole local mesh:
//! every pending and future `send`/`recv` on every rank of this process returns
//! [`CommError::PeerLost`] naming the lost process's first rank and address, and the other
//! connections are closed so that the rest of the group learns about it promptly. The group must
//! then restart. Messages that had fully arrived before the failure can still be received (so a
//! last message sent just before a peer stops is not lost); a `recv` with nothing queued fails.
//! Dropping the last endpoint of a process, or calling [`Communicator::shutdown`], closes its
//! connections: the other processes see it as lost. TCP keepalive and a user timeout bound how long a silently vanished host goes
//! unnoticed.

mod local;
mod mailbox;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

pub use local::LocalComm;
#[cfg(feature = "cuda")]
pub use nccl::{NcclComm, NCCL_UNIQUE_ID_BYTES};
pub use tcp::{join_tcp, join_tcp_on, join_tcp_with_listener, TcpComm, MAX_FRAME_BYTES};

/// What a message is for; each (source rank, tag) pair is its own FIFO queue at the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// Scheduler commands from the driver rank to the others.
    Control,
    /// Hidden states passed between pipeline stages.
    Activation,
    /// Logits sent back to the driver rank.
    Logits,
    /// Traffic of the collectives (all-reduce, all-gather).
    Collective,
}

impl Tag {
    /// The tag's byte on the wire.
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Tag::Control => 0,
            Tag::Activation => 1,
            Tag::Logits => 2,
            Tag::Collective => 3,
        }
    }

    /// The tag for a wire byte, if it names one.
    pub(crate) fn from_byte(b: u8) -> Option<Tag> {
        match b {
            0 => Some(Tag::Control),
            1 => Some(Tag::Activation),
            2 => Some(Tag::Logits),
            3 => Some(Tag::Collective),
            _ => None,
        }
    }
}

/// Why a communication failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer process went away or broke the protocol; the group must restart.
    #[error("rank {rank} ({addr}) was lost: {reason}; the group must restart")]
    PeerLost {
        /// First rank of the lost process.
        rank: usize,
        /// The lost process's `--peers` address.
        addr: String,
        /// What was observed (connection reset, closed, malformed frame...).
        reason: String,
    },
    /// Not every process joined within the time limit.
    #[error(
        "peers did not all join within {}s: still waiting for {}; check --peers and that every rank is running",
        .waited.as_secs_f32().round(),
        .missing.join(", ")
    )]
    JoinTimeout {
        /// How long the join waited.
        waited: Duration,
        /// The processes that never completed the handshake, e.g. `127.0.0.1:9101 (process 1)`.
        missing: Vec<String>,
    },
    /// The group's layout is inconsistent (world, `--peers`, process index).
    #[error("{0}")]
    Layout(String),
    /// A peer sent something this version does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local I/O failure (binding the listening port, starting a thread).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The implementation cannot run here (e.g. NCCL without libcuda or libnccl).
    #[error("{0}")]
    Unavailable(String),
    /// The caller passed an impossible argument (rank out of range, bad group, message too big).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// This process shut its communicator down.
    #[error("the communicator was shut down")]
    Shutdown,
}

/// One rank's endpoint. `Send + Sync`; cheap to share via `Arc`.
///
/// Collectives must be called by every member of the group, in the same order on each: their
/// messages travel on [`Tag::Collective`], FIFO per source rank.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This endpoint's rank.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world(&self) -> usize;

    /// Sends raw bytes to rank `to`. Buffered: does not wait for the receiver to call `recv`.
    fn send(&self, to: usize, tag: Tag, data: &[u8]) -> Result<(), CommError>;

    /// Receives the oldest message from rank `from` with `tag`, blocking until there is one.
    fn recv(&self, from: usize, tag: Tag) -> Result<Vec<u8>, CommError>;

    /// Sends `f32`s, little-endian.
    fn send_f32(&self, to: usize, tag: Tag, data: &[f32]) -> Result<(), CommError> {
        self.send(to, tag, &f32_to_bytes(data))
    }

    /// Receives `f32`s sent with [`Communicator::send_f32`].
    fn recv_f32(&self, from: usize, tag: Tag) -> Result<Vec<f32>, CommError> {
        bytes_to_f32(&self.recv(from, tag)?)
    }

    /// Sums `data` element-wise across the ranks of `group` (global rank ids, same order on every
    /// member, containing this rank); every member ends with the same, bit-identical sum.
    ///
    /// Default: ring all-reduce (reduce-scatter then all-gather, `n - 1` steps each) over
    /// send/recv with [`Tag::Collective`]. Each chunk is summed by one fixed chain of members and
    /// then copied to the others, so the result is deterministic and identical everywhere.
    fn all_reduce_sum(&self, group: &[usize], data: &mut [f32]) -> Result<(), CommError> {
        ring_all_reduce_sum(self, group, data)
    }

    /// Every member's `data` (lengths may differ per member) concatenated in group order, on
    /// every member. Default: ring all-gather over send/recv with [`Tag::Collective`].
    fn all_gather(&self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError> {
        ring_all_gather(self, group, data)
    }

    /// Stops this process's side of the group: pending and future operations on every local rank
    /// fail with [`CommError::Shutdown`], and connections to other processes are closed (they see
    /// this process as lost). Default: nothing to do.
    fn shutdown(&self) {}
}

/// An in-process group of `world` ranks, one endpoint per rank, for ranks running as threads.
pub fn local_group(world: usize) -> Vec<Arc<dyn Communicator>> {
    LocalComm::group(world)
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect()
}

/// Little-endian bytes of `data`.
pub(crate) fn f32_to_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `f32`s from little-endian bytes; the length must be a multiple of 4.
pub(crate) fn bytes_to_f32(bytes: &[u8]) -> Result<Vec<f32>, CommError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CommError::Protocol(format!(
            "expected f32 values but the message has {} bytes, not a multiple of 4",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// This rank's position in `group`, after checking that the group is well formed.
fn group_position<C: Communicator + ?Sized>(comm: &C, group: &[usize]) -> Result<usize, CommError> {
    let world = comm.world();
    for (i, &r) in group.iter().enumerate() {
        if r >= world {
            return Err(CommError::InvalidArgument(format!(
                "group {group:?} names rank {r}, but the world has {world} ranks"
            )));
        }
        if group[..i].contains(&r) {
            return Err(CommError::InvalidArgument(format!(
                "group {group:?} names rank {r} twice"
            )));
        }
    }
    group.iter().position(|&r| r == comm.rank()).ok_or_else(|| {
        CommError::InvalidArgument(format!(
            "rank {} is not a member of group {group:?}",
            comm.rank()
        ))
    })
}

/// Elements of chunk `c` when `len` elements are split into `n` near-equal chunks.
fn chunk(len: usize, n: usize, c: usize) -> Range<usize> {
    (c * len / n)..((c + 1) * len / n)
}

/// Receives a collective chunk from `from` and checks its length.
fn recv_chunk<C: Communicator + ?Sized>(
    comm: &C,
    from: usize,
    expected: usize,
    what: &str,
) -> Result<Vec<f32>, CommError> {
    let got = comm.recv_f32(from, Tag::Collective)?;
    if got.len() != expected {
        return Err(CommError::Protocol(format!(
            "{what}: rank {from} sent {} values where {expected} were expected; every member must \
             pass the same length and call the collectives in the same order",
            got.len()
        )));
    }
    Ok(got)
}

/// Ring all-reduce (sum) over point-to-point messages.
pub(crate) fn ring_all_reduce_sum<C: Communicator + ?Sized>(
    comm: &C,
    group: &[usize],
    data: &mut [f32],
) -> Result<(), CommError> {
    let me = group_position(comm, group)?;
    let n = group.len();
    if n == 1 {
        return Ok(());
    }
    let next = group[(me + 1) % n];
    let prev = group[(me + n - 1) % n];
    let len = data.len();
    // Reduce-scatter: chunk c starts at member c and is added to by c+1, c+2, ... in ring order;
    // after n-1 steps member i holds the full sum of chunk i+1.
    for step in 0..n - 1 {
        let send_c = (me + n - step) % n;
        let recv_c = (me + 2 * n - step - 1) % n;
        comm.send_f32(next, Tag::Collective, &data[chunk(len, n, send_c)])?;
        let r = chunk(len, n, recv_c);
        let got = recv_chunk(comm, prev, r.len(), "all_reduce_sum")?;
        for (d, g) in data[r].iter_mut().zip(got) {
            *d += g;
        }
    }
    // All-gather: each finished chunk travels once around the ring, copied as is.
    for step in 0..n - 1 {
        let send_c = (me + 1 + n - step) % n;
        let recv_c = (me + n - step) % n;
        comm.send_f32(next, Tag::Collective, &data[chunk(len, n, send_c)])?;
        let r = chunk(len, n, recv_c);
        let got = recv_chunk(comm, prev, r.len(), "all_reduce_sum")?;
        data[r].copy_from_slice(&got);
    }
    Ok(())
}

/// Ring all-gather of per-member blocks of any length.
pub(crate) fn ring_all_gather<C: Communicator + ?Sized>(
    comm: &C,
    group: &[usize],
    data: &[f32],
) -> Result<Vec<f32>, CommError> {
    let me = group_position(comm, group)?;
    let n = group.len();
    if n == 1 {
        return Ok(data.to_vec());
    }
    let next = group[(me + 1) % n];
    let prev = group[(me + n - 1) % n];
    let mut blocks: Vec<Option<Vec<f32>>> = vec![None; n];
    blocks[me] = Some(data.to_vec());
    for step in 0..n - 1 {
        let send_b = (me + n - step) % n;
        let recv_b = (me + 2 * n - step - 1) % n;
        let block = blocks[send_b].as_deref().ok_or_else(|| {
            CommError::Protocol(format!("all_gather: block {send_b} missing at step {step}"))
        })?;
        comm.send_f32(next, Tag::Collective, block)?;
        blocks[recv_b] = Some(comm.recv_f32(prev, Tag::Collective)?);
    }
    Ok(blocks.into_iter().flatten().flatten().collect())
}
