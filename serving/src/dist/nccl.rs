//! Collectives through NCCL on the GPU (feature `cuda`).
//!
//! CUDA and NCCL are loaded at run time, so this compiles and links without the CUDA toolkit;
//! on a machine without `libcuda` or `libnccl` construction fails with
//! [`CommError::Unavailable`]. NCCL is looked up under the names the `cudarc` crate tries
//! (`libnccl.so` among them): where only `libnccl.so.2` is installed, a `libnccl.so` symlink on
//! the library path is needed.
//!
//! The NCCL communicator lives on a worker thread that owns the CUDA context and stream; the
//! endpoint hands it host buffers over a channel. Point-to-point messages, and collectives over a
//! group other than the one the NCCL communicator was made for, go through the host
//! communicator the endpoint wraps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{CommError, Communicator, Tag};

/// Size of an NCCL unique id, the token that lets the members of a group find each other.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

type Reply<T> = mpsc::Sender<Result<T, CommError>>;

enum Job {
    AllReduce(Vec<f32>, Reply<Vec<f32>>),
    AllGather(Vec<f32>, Reply<Vec<f32>>),
}

/// One rank's endpoint whose collectives run through NCCL.
///
/// It wraps a host communicator (TCP or in-process) that carries the point-to-point messages,
/// bootstraps the NCCL unique id, and runs collectives over groups other than `members`.
///
/// Every member gets the same all-reduce result (NCCL reduces each element once and broadcasts
/// it), but the summation order is NCCL's choice: pin it (e.g. `NCCL_ALGO=Ring`) where runs must
/// reproduce each other bit for bit.
#[derive(Debug)]
pub struct NcclComm {
    host: Arc<dyn Communicator>,
    members: Vec<usize>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::AllReduce(d, _) => write!(f, "AllReduce({} values)", d.len()),
            Job::AllGather(d, _) => write!(f, "AllGather({} values)", d.len()),
        }
    }
}

fn unavailable(what: &str, detail: impl std::fmt::Debug) -> CommError {
    CommError::Unavailable(format!("{what}: {detail:?}"))
}

fn nccl_err(what: &str) -> impl Fn(NcclError) -> CommError + '_ {
    move |e| CommError::Unavailable(format!("{what} failed: {:?}", e.0))
}

fn driver_err(what: &str) -> impl Fn(DriverError) -> CommError + '_ {
    move |e| CommError::Unavailable(format!("{what} failed: {e}"))
}

/// Checks that the CUDA driver and NCCL libraries can be loaded, so that the loader's panics
/// are never reached.
#[allow(unsafe_code)]
fn check_libraries() -> Result<(), CommError> {
    // SAFETY: these only try to open the candidate shared libraries by name and close them
    // again; no symbol is called.
    let cuda = unsafe { cudarc::driver::sys::is_culib_present() };
    if !cuda {
        return Err(CommError::Unavailable(
            "NCCL needs the CUDA driver, but libcuda could not be loaded: is there a GPU and \
             its driver on this machine?"
                .into(),
        ));
    }
    // SAFETY: as above.
    let nccl = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !nccl {
        return Err(CommError::Unavailable(
            "libnccl could not be loaded: install NCCL and make `libnccl.so` resolvable (e.g. a \
             symlink to libnccl.so.2 on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    Ok(())
}

/// Runs `f`, turning a panic inside the CUDA/NCCL bindings into [`CommError::Unavailable`].
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(CommError::Unavailable(format!("{what}: {msg}")))
    })
}

impl NcclComm {
    /// A fresh NCCL unique id, made by one member and handed to the others before
    /// [`NcclComm::new`].
    pub fn unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES], CommError> {
        check_libraries()?;
        guarded("creating an NCCL unique id", || {
            let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
            let mut out = [0u8; NCCL_UNIQUE_ID_BYTES];
            for (o, c) in out.iter_mut().zip(id.internal()) {
                *o = c.to_ne_bytes()[0];
            }
            Ok(out)
        })
    }

    /// Joins the NCCL communicator of `members` (global ranks, same order everywhere, containing
    /// `host.rank()`) on CUDA device `device_ordinal`, with the `unique_id` that every member got
    /// from the same [`NcclComm::unique_id`] call. Blocks until every member has joined.
    pub fn new(
        host: Arc<dyn Communicator>,
        members: &[usize],
        device_ordinal: usize,
        unique_id: [u8; NCCL_UNIQUE_ID_BYTES],
    ) -> Result<Self, CommError> {
        let index = members
            .iter()
            .position(|&r| r == host.rank())
            .ok_or_else(|| {
                CommError::InvalidArgument(format!(
                    "rank {} is not a member of NCCL group {members:?}",
                    host.rank()
                ))
            })?;
        check_libraries()?;
        let n = members.len();
        let (init_tx, init_rx) = mpsc::channel::<Result<(), CommError>>();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name(format!("nccl-rank{}", host.rank()))
            .spawn(move || worker(device_ordinal, index, n, unique_id, init_tx, job_rx))
            .map_err(|source| CommError::Io {
                context: "starting the NCCL worker thread".into(),
                source,
            })?;
        match init_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(CommError::Unavailable(
                    "the NCCL worker thread stopped during initialisation".into(),
                ))
            }
        }
        tracing::info!(
            rank = host.rank(),
            device = device_ordinal,
            members = ?members,
            "NCCL communicator ready"
        );
        Ok(Self {
            host,
            members: members.to_vec(),
            jobs: Mutex::new(Some(job_tx)),
        })
    }

    /// [`NcclComm::new`] with the unique id made by `members[0]` and sent to the other members
    /// over `host` (with [`Tag::Collective`]: call it at the same point on every member). If the
    /// id cannot be made, every member gets the error.
    pub fn bootstrap(
        host: Arc<dyn Communicator>,
        members: &[usize],
        device_ordinal: usize,
    ) -> Result<Self, CommError> {
        let Some(&root) = members.first() else {
            return Err(CommError::InvalidArgument("empty NCCL group".into()));
        };
        let id = if host.rank() == root {
            let made = NcclComm::unique_id();
            let msg = match &made {
                Ok(id) => [&[1u8][..], &id[..]].concat(),
                Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
            };
            for &r in members.iter().filter(|&&r| r != root) {
                host.send(r, Tag::Collective, &msg)?;
            }
            made?
        } else {
            let msg = host.recv(root, Tag::Collective)?;
            match msg.split_first() {
                Some((1, id)) if id.len() == NCCL_UNIQUE_ID_BYTES => {
                    let mut out = [0u8; NCCL_UNIQUE_ID_BYTES];
                    out.copy_from_slice(id);
                    out
                }
                Some((0, why)) => {
                    return Err(CommError::Unavailable(format!(
                        "rank {root} could not create the NCCL id: {}",
                        String::from_utf8_lossy(why)
                    )))
                }
                _ => {
                    return Err(CommError::Protocol(format!(
                        "malformed NCCL id message of {} bytes from rank {root}",
                        msg.len()
                    )))
                }
            }
        };
        NcclComm::new(host, members, device_ordinal, id)
    }

    /// The ranks the NCCL communicator spans.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    fn run(&self, make: impl FnOnce(Reply<Vec<f32>>) -> Job) -> Result<Vec<f32>, CommError> {
        let (tx, rx) = mpsc::channel();
        let sent = {
            let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            match jobs.as_ref() {
                Some(j) => j.send(make(tx)).is_ok(),
                None => return Err(CommError::Shutdown),
            }
        };
        if !sent {
            return Err(CommError::Unavailable(
                "the NCCL worker thread has stopped".into(),
            ));
        }
        rx.recv().unwrap_or_else(|_| {
            Err(CommError::Unavailable(
                "the NCCL worker thread stopped during a collective".into(),
            ))
        })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world(&self) -> usize {
        self.host.world()
    }

    fn send(&self, to: usize, tag: Tag, data: &[u8]) -> Result<(), CommError> {
        self.host.send(to, tag, data)
    }

    fn recv(&self, from: usize, tag: Tag) -> Result<Vec<u8>, CommError> {
        self.host.recv(from, tag)
    }

    /// Through NCCL when `group` is the NCCL group, else through the host communicator.
    fn all_reduce_sum(&self, group: &[usize], data: &mut [f32]) -> Result<(), CommError> {
        if group != self.members.as_slice() {
            return self.host.all_reduce_sum(group, data);
        }
        if group.len() == 1 || data.is_empty() {
            return Ok(());
        }
        let out = self.run(|reply| Job::AllReduce(data.to_vec(), reply))?;
        if out.len() != data.len() {
            return Err(CommError::Protocol(format!(
                "NCCL all-reduce returned {} values for {}",
                out.len(),
                data.len()
            )));
        }
        data.copy_from_slice(&out);
        Ok(())
    }

    /// Through NCCL when `group` is the NCCL group, else through the host communicator.
    fn all_gather(&self, group: &[usize], data: &[f32]) -> Result<Vec<f32>, CommError> {
        if group != self.members.as_slice() {
            return self.host.all_gather(group, data);
        }
        if group.len() == 1 {
            return Ok(data.to_vec());
        }
        self.run(|reply| Job::AllGather(data.to_vec(), reply))
    }

    /// Stops the NCCL worker and shuts the host communicator down.
    fn shutdown(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.host.shutdown();
    }
}

/// The thread that owns the CUDA context, stream and NCCL communicator.
fn worker(
    ordinal: usize,
    index: usize,
    n: usize,
    unique_id: [u8; NCCL_UNIQUE_ID_BYTES],
    init: mpsc::Sender<Result<(), CommError>>,
    jobs: mpsc::Receiver<Job>,
) {
    let setup = guarded("initialising NCCL", || {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(&format!("opening CUDA device {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let mut internal = [0 as std::ffi::c_char; NCCL_UNIQUE_ID_BYTES];
        for (i, b) in internal.iter_mut().zip(unique_id) {
            *i = std::ffi::c_char::from_ne_bytes([b]);
        }
        let comm = Comm::from_rank(stream.clone(), index, n, Id::uninit(internal))
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok((stream, comm))
    });
    let (stream, comm) = match setup {
        Ok(v) => v,
        Err(e) => {
            let _ = init.send(Err(e));
            return;
        }
    };
    if init.send(Ok(())).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        match job {
            Job::AllReduce(data, reply) => {
                let r = guarded("NCCL all-reduce", || all_reduce(&stream, &comm, &data));
                let _ = reply.send(r);
            }
            Job::AllGather(data, reply) => {
                let r = guarded("NCCL all-gather", || all_gather(&stream, &comm, n, &data));
                let _ = reply.send(r);
            }
        }
    }
}

fn all_reduce(stream: &Arc<CudaStream>, comm: &Comm, data: &[f32]) -> Result<Vec<f32>, CommError> {
    let mut buf = stream
        .clone_htod(data)
        .map_err(driver_err("copying to the GPU"))?;
    comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum)
        .map_err(nccl_err("ncclAllReduce"))?;
    let out = stream
        .clone_dtoh(&buf)
        .map_err(driver_err("copying from the GPU"))?;
    stream
        .synchronize()
        .map_err(driver_err("waiting for the GPU"))?;
    Ok(out)
}

/// All-gather of blocks of any length: gathers the lengths, pads every block to the longest,
/// gathers the padded blocks, and drops the padding.
fn all_gather(
    stream: &Arc<CudaStream>,
    comm: &Comm,
    n: usize,
    data: &[f32],
) -> Result<Vec<f32>, CommError> {
    let len_buf = stream
        .clone_htod(&[data.len() as u64])
        .map_err(driver_err("copying to the GPU"))?;
    let mut lens_buf = stream
        .alloc_zeros::<u64>(n)
        .map_err(driver_err("allocating GPU memory"))?;
    comm.all_gather(&len_buf, &mut lens_buf)
        .map_err(nccl_err("ncclAllGather"))?;
    let lens = stream
        .clone_dtoh(&lens_buf)
        .map_err(driver_err("copying from the GPU"))?;
    stream
        .synchronize()
        .map_err(driver_err("waiting for the GPU"))?;
    let lens: Vec<usize> = lens
        .into_iter()
        .map(|l| usize::try_from(l).unwrap_or(usize::MAX))
        .collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    if longest == 0 {
        return Ok(Vec::new());
    }
    let total = longest.checked_mul(n).ok_or_else(|| {
        CommError::Protocol(format!(
            "all-gather blocks of {longest} values are too large"
        ))
    })?;
    let mut padded = data.to_vec();
    padded.resize(longest, 0.0);
    let send = stream
        .clone_htod(&padded)
        .map_err(driver_err("copying to the GPU"))?;
    let mut recv = stream
        .alloc_zeros::<f32>(total)
        .map_err(driver_err("allocating GPU memory"))?;
    comm.all_gather(&send, &mut recv)
        .map_err(nccl_err("ncclAllGather"))?;
    let gathered = stream
        .clone_dtoh(&recv)
        .map_err(driver_err("copying from the GPU"))?;
    stream
        .synchronize()
        .map_err(driver_err("waiting for the GPU"))?;
    let mut out = Vec::with_capacity(lens.iter().sum());
    for (i, &l) in lens.iter().enumerate() {
        out.extend_from_slice(&gathered[i * longest..i * longest + l]);
    }
    Ok(out)
}
