//! The TCP mesh: one connection per pair of processes, a reader thread per connection that
//! sorts frames into the local ranks' inboxes, and writes serialized by a mutex per connection.
//! The wire format is described in the module above.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::mailbox::{Mailbox, Poison};
use super::{local_group, CommError, Communicator, Tag};

/// Largest payload one frame may carry (1 GiB); a header announcing more is a protocol error.
pub const MAX_FRAME_BYTES: u64 = 1 << 30;

pub(crate) const MAGIC: [u8; 8] = *b"LLMODIST";
pub(crate) const VERSION: u32 = 1;
pub(crate) const HELLO_LEN: usize = 28;
const WELCOME_FIXED_LEN: usize = 29;
pub(crate) const HEADER_LEN: usize = 17;
/// Largest payload buffer reserved before its bytes arrive.
const PREALLOCATE_MAX: u64 = 64 << 20;
/// Tag byte of an abort notice (see the module docs).
const TAG_ABORT: u8 = 0xFF;
const STATUS_OK: u8 = 0;
const STATUS_LAYOUT: u8 = 1;
const STATUS_PROTOCOL: u8 = 2;
const MAX_REASON_BYTES: usize = 4096;

/// How long one handshake may take before the attempt is abandoned (and retried).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one TCP connect attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between connect attempts to a process that is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Pause of the join loop between polls of the listener.
const POLL_PAUSE: Duration = Duration::from_millis(10);
/// How often the join logs which peers it still waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The group's shape as seen by one process, checked once.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) peers: Vec<String>,
    pub(crate) process: usize,
    pub(crate) world: usize,
    pub(crate) rpp: usize,
}

impl Layout {
    pub(crate) fn new(peers: &[String], process: usize, world: usize) -> Result<Self, CommError> {
        let n = peers.len();
        if n == 0 {
            return Err(CommError::Layout(
                "--peers is empty: it must list every process's HOST:PORT, this one included"
                    .into(),
            ));
        }
        if process >= n {
            return Err(CommError::Layout(format!(
                "this is process {process}, but --peers has only {n} entries"
            )));
        }
        if world == 0 {
            return Err(CommError::Layout(
                "the world must have at least one rank".into(),
            ));
        }
        if !world.is_multiple_of(n) {
            return Err(CommError::Layout(format!(
                "--peers has {n} entries but the world of {world} ranks does not divide evenly \
                 among them"
            )));
        }
        for (i, p) in peers.iter().enumerate() {
            parse_port(p).ok_or_else(|| {
                CommError::Layout(format!("--peers entry {i} (`{p}`) is not HOST:PORT"))
            })?;
            if peers[..i].contains(p) {
                return Err(CommError::Layout(format!(
                    "--peers lists {p} twice: every process needs its own HOST:PORT"
                )));
            }
        }
        Ok(Self {
            peers: peers.to_vec(),
            process,
            world,
            rpp: world / n,
        })
    }

    pub(crate) fn processes(&self) -> usize {
        self.peers.len()
    }

    fn first_rank(&self, process: usize) -> usize {
        process * self.rpp
    }

    fn process_of(&self, rank: usize) -> usize {
        rank / self.rpp
    }

    fn describe(&self, process: usize) -> String {
        format!("{} (process {process})", self.peers[process])
    }
}

/// The port of a `HOST:PORT` entry.
fn parse_port(entry: &str) -> Option<u16> {
    let (host, port) = entry.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    port.parse().ok()
}

/// The handshake's first message, from the connecting process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) process: u32,
    pub(crate) world: u32,
    pub(crate) processes: u32,
    pub(crate) target: u32,
}

impl Hello {
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.process.to_le_bytes());
        b[16..20].copy_from_slice(&self.world.to_le_bytes());
        b[20..24].copy_from_slice(&self.processes.to_le_bytes());
        b[24..28].copy_from_slice(&self.target.to_le_bytes());
        b
    }

    /// `None` when the bytes do not start with the magic.
    pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        if b[..8] != MAGIC {
            return None;
        }
        Some(Self {
            version: le_u32(&b[8..12]),
            process: le_u32(&b[12..16]),
            world: le_u32(&b[16..20]),
            processes: le_u32(&b[20..24]),
            target: le_u32(&b[24..28]),
        })
    }
}

/// The accepting process's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub(crate) version: u32,
    pub(crate) process: u32,
    pub(crate) world: u32,
    pub(crate) processes: u32,
    pub(crate) status: u8,
    pub(crate) reason: String,
}

impl Welcome {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let reason = truncate_utf8(&self.reason, MAX_REASON_BYTES);
        let mut b = Vec::with_capacity(WELCOME_FIXED_LEN + reason.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.process.to_le_bytes());
        b.extend_from_slice(&self.world.to_le_bytes());
        b.extend_from_slice(&self.processes.to_le_bytes());
        b.push(self.status);
        b.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        b.extend_from_slice(reason.as_bytes());
        b
    }

    /// Reads a welcome; `Ok(None)` when the peer does not speak this protocol (bad magic).
    pub(crate) fn read(r: &mut impl Read) -> io::Result<Option<Self>> {
        let mut b = [0u8; WELCOME_FIXED_LEN];
        r.read_exact(&mut b)?;
        if b[..8] != MAGIC {
            return Ok(None);
        }
        let reason_len = le_u32(&b[25..29]) as usize;
        if reason_len > MAX_REASON_BYTES {
            return Ok(None);
        }
        let mut reason = vec![0u8; reason_len];
        r.read_exact(&mut reason)?;
        Ok(Some(Self {
            version: le_u32(&b[8..12]),
            process: le_u32(&b[12..16]),
            world: le_u32(&b[16..20]),
            processes: le_u32(&b[20..24]),
            status: b[24],
            reason: String::from_utf8_lossy(&reason).into_owned(),
        }))
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A frame header: source rank, destination rank, tag byte, payload length.
pub(crate) fn encode_header(src: u32, dst: u32, tag: u8, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&src.to_le_bytes());
    h[4..8].copy_from_slice(&dst.to_le_bytes());
    h[8] = tag;
    h[9..17].copy_from_slice(&len.to_le_bytes());
    h
}

/// Converts a rank or count to its `u32` wire form.
fn wire_u32(v: usize, what: &str) -> Result<u32, CommError> {
    u32::try_from(v).map_err(|_| CommError::InvalidArgument(format!("{what} {v} exceeds u32")))
}

/// Joins the TCP mesh of the group: listens on the port of `peers[process]` on all interfaces,
/// connects to the processes with a lower index, and waits for those with a higher index to
/// connect, retrying until all have joined or `timeout` passes. Returns one endpoint per rank
/// this process hosts, in rank order. With a single peer, the group is in-process and no socket
/// is opened.
pub fn join_tcp(
    peers: &[String],
    process: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<Arc<dyn Communicator>>, CommError> {
    let all = if peers.get(process).is_some_and(|p| p.starts_with('[')) {
        "::"
    } else {
        "0.0.0.0"
    };
    join_tcp_on(all, peers, process, world, timeout)
}

/// Like [`join_tcp`], listening on `host` (an address of this machine, or `0.0.0.0`/`::` for
/// all) rather than on all interfaces.
pub fn join_tcp_on(
    host: &str,
    peers: &[String],
    process: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<Arc<dyn Communicator>>, CommError> {
    let layout = Layout::new(peers, process, world)?;
    if layout.processes() == 1 {
        return Ok(local_group(world));
    }
    let own = &layout.peers[process];
    let port = parse_port(own).unwrap_or_default();
    let bind = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let listener = TcpListener::bind(&bind).map_err(|source| CommError::Io {
        context: format!("listening on {bind} (the port of this process's --peers entry {own})"),
        source,
    })?;
    join_with_layout(listener, layout, timeout)
}

/// Like [`join_tcp`], on a listener the caller already bound (e.g. to port 0 in tests). The
/// listener must be reachable at `peers[process]` by the other processes.
pub fn join_tcp_with_listener(
    listener: TcpListener,
    peers: &[String],
    process: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<Arc<dyn Communicator>>, CommError> {
    let layout = Layout::new(peers, process, world)?;
    join_with_layout(listener, layout, timeout)
}

/// Outcome of one failed connect attempt.
enum Attempt {
    /// Worth trying again (not up yet, reset, timed out); the text says what happened.
    Retry(String),
    /// Misconfiguration that retrying cannot fix.
    Fatal(CommError),
}

fn join_with_layout(
    listener: TcpListener,
    layout: Layout,
    timeout: Duration,
) -> Result<Vec<Arc<dyn Communicator>>, CommError> {
    let n = layout.processes();
    let me = layout.process;
    listener
        .set_nonblocking(true)
        .map_err(|source| CommError::Io {
            context: "setting the listening socket non-blocking".into(),
            source,
        })?;
    let start = Instant::now();
    let deadline = start + timeout;
    let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut next_try = vec![start; n];
    let mut last_error: Vec<Option<String>> = vec![None; n];
    let mut next_progress = start + PROGRESS_EVERY;
    tracing::info!(
        process = me,
        world = layout.world,
        processes = n,
        peers = %layout.peers.join(","),
        "joining the rank group"
    );
    loop {
        let missing: Vec<usize> = (0..n)
            .filter(|&q| q != me && streams[q].is_none())
            .collect();
        if missing.is_empty() {
            break;
        }
        let now = Instant::now();
        let describe_missing = || -> Vec<String> {
            missing
                .iter()
                .map(|&q| match &last_error[q] {
                    Some(e) => format!("{} (process {q}, last attempt: {e})", layout.peers[q]),
                    None => layout.describe(q),
                })
                .collect()
        };
        if now >= deadline {
            return Err(CommError::JoinTimeout {
                waited: now - start,
                missing: describe_missing(),
            });
        }
        if now >= next_progress {
            next_progress += PROGRESS_EVERY;
            tracing::info!(
                process = me,
                waited_s = (now - start).as_secs(),
                missing = %describe_missing().join(", "),
                "still waiting for peers to join"
            );
        }

        // Processes with a higher index connect to us.
        loop {
            match listener.accept() {
                Ok((stream, from)) => {
                    if let Some(q) = accept_peer(stream, from, &layout, deadline, &mut streams)? {
                        tracing::info!(process = me, peer = q, addr = %from, "peer joined");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(process = me, error = %e, "accepting a peer connection failed");
                    break;
                }
            }
        }

        // We connect to processes with a lower index.
        for &q in missing.iter().filter(|&&q| q < me) {
            if Instant::now() < next_try[q] || streams[q].is_some() {
                continue;
            }
            match connect_peer(&layout, q, deadline) {
                Ok(stream) => {
                    tracing::info!(process = me, peer = q, addr = %layout.peers[q], "joined peer");
                    streams[q] = Some(stream);
                }
                Err(Attempt::Retry(why)) => {
                    tracing::debug!(process = me, peer = q, addr = %layout.peers[q], error = %why, "peer not reachable yet");
                    last_error[q] = Some(why);
                    next_try[q] = Instant::now() + RETRY_PAUSE;
                }
                Err(Attempt::Fatal(e)) => return Err(e),
            }
        }
        thread::sleep(POLL_PAUSE);
    }
    drop(listener);
    start_mesh(layout, streams)
}

/// Handles one incoming connection during the join. Returns the peer's process index when it
/// completed the handshake; stray connections are logged and dropped.
fn accept_peer(
    mut stream: TcpStream,
    from: SocketAddr,
    layout: &Layout,
    deadline: Instant,
    streams: &mut [Option<TcpStream>],
) -> Result<Option<usize>, CommError> {
    let me = layout.process;
    let limit = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), HANDSHAKE_TIMEOUT);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(limit)))
        .and_then(|()| stream.set_write_timeout(Some(limit)))
        .and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        tracing::warn!(process = me, addr = %from, error = %e, "could not set up an incoming connection; dropped");
        return Ok(None);
    }
    let mut buf = [0u8; HELLO_LEN];
    if let Err(e) = stream.read_exact(&mut buf) {
        tracing::warn!(process = me, addr = %from, error = %e, "incoming connection sent no handshake; dropped");
        return Ok(None);
    }
    let Some(hello) = Hello::decode(&buf) else {
        tracing::warn!(process = me, addr = %from, "incoming connection is not an llmo-serve rank (bad magic); dropped");
        return Ok(None);
    };
    let mut welcome = Welcome {
        version: VERSION,
        process: me as u32,
        world: layout.world as u32,
        processes: layout.processes() as u32,
        status: STATUS_OK,
        reason: String::new(),
    };
    let q = hello.process as usize;
    let peer_name = if q < layout.processes() {
        layout.describe(q)
    } else {
        format!("process {q} at {from}")
    };
    let rejection = if hello.version != VERSION {
        Some((
            STATUS_PROTOCOL,
            format!(
                "{peer_name} speaks protocol version {}, this process speaks {VERSION}: every rank \
                 must run the same llmo-serve version",
                hello.version
            ),
        ))
    } else if hello.world as usize != layout.world || hello.processes as usize != layout.processes()
    {
        Some((
            STATUS_LAYOUT,
            format!(
                "{peer_name} has a world of {} ranks over {} processes, but {} has a world of {} \
                 ranks over {} processes: every rank must be started with the same world size and \
                 --peers",
                hello.world,
                hello.processes,
                layout.describe(me),
                layout.world,
                layout.processes()
            ),
        ))
    } else if hello.target as usize != me {
        Some((
            STATUS_LAYOUT,
            format!(
                "{peer_name} connected to {} expecting process {}, but it is process {me}: --peers \
                 must list the same addresses in the same order on every rank",
                layout.peers[me], hello.target
            ),
        ))
    } else if q >= layout.processes() || q <= me {
        Some((
            STATUS_LAYOUT,
            format!(
                "{peer_name} connected to process {me}, but only processes with a higher index \
                 connect to it: check the process index given to each rank"
            ),
        ))
    } else {
        None
    };
    if let Some((status, reason)) = rejection {
        welcome.status = status;
        welcome.reason = reason.clone();
        let err = if status == STATUS_PROTOCOL {
            CommError::Protocol(reason)
        } else {
            CommError::Layout(reason)
        };
        // Best effort: the peer learns why; our own join fails either way.
        let _ = stream.write_all(&welcome.encode());
        tracing::error!(process = me, addr = %from, error = %err, "peer handshake rejected");
        return Err(err);
    }
    if let Err(e) = stream.write_all(&welcome.encode()) {
        tracing::warn!(process = me, addr = %from, error = %e, "could not answer a peer's handshake; dropped");
        return Ok(None);
    }
    if streams[q].is_some() {
        tracing::warn!(process = me, peer = q, addr = %from, "peer connected again; replacing its earlier connection");
    }
    streams[q] = Some(stream);
    Ok(Some(q))
}

/// Connects to lower-index process `q` and runs the handshake.
fn connect_peer(layout: &Layout, q: usize, deadline: Instant) -> Result<TcpStream, Attempt> {
    let me = layout.process;
    let addr = &layout.peers[q];
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Attempt::Retry(format!("cannot resolve {addr}: {e}")))?
        .collect();
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10))
    };
    let mut last = format!("{addr} resolved to no address");
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, remaining().min(CONNECT_TIMEOUT)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let Some(mut stream) = stream else {
        return Err(Attempt::Retry(last));
    };
    let limit = remaining().min(HANDSHAKE_TIMEOUT);
    let retry = |e: io::Error| Attempt::Retry(format!("handshake failed: {e}"));
    stream
        .set_read_timeout(Some(limit))
        .and_then(|()| stream.set_write_timeout(Some(limit)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(retry)?;
    let hello = Hello {
        version: VERSION,
        process: me as u32,
        world: layout.world as u32,
        processes: layout.processes() as u32,
        target: q as u32,
    };
    stream.write_all(&hello.encode()).map_err(retry)?;
    let welcome = match Welcome::read(&mut stream) {
        Ok(Some(w)) => w,
        Ok(None) => {
            return Err(Attempt::Fatal(CommError::Protocol(format!(
                "{} answered but is not an llmo-serve rank (bad handshake magic): check --peers",
                layout.describe(q)
            ))))
        }
        Err(e) => return Err(retry(e)),
    };
    match welcome.status {
        STATUS_OK => {}
        STATUS_LAYOUT => {
            return Err(Attempt::Fatal(CommError::Layout(format!(
                "{} rejected this process: {}",
                layout.describe(q),
                welcome.reason
            ))))
        }
        _ => {
            return Err(Attempt::Fatal(CommError::Protocol(format!(
                "{} rejected this process: {}",
                layout.describe(q),
                welcome.reason
            ))))
        }
    }
    if welcome.version != VERSION {
        return Err(Attempt::Fatal(CommError::Protocol(format!(
            "{} speaks protocol version {}, this process speaks {VERSION}",
            layout.describe(q),
            welcome.version
        ))));
    }
    if welcome.world as usize != layout.world
        || welcome.processes as usize != layout.processes()
        || welcome.process as usize != q
    {
        return Err(Attempt::Fatal(CommError::Layout(format!(
            "{} is process {} of a world of {} ranks over {} processes, but this process expected \
             process {q} of {} ranks over {} processes: every rank must get the same world size \
             and --peers",
            layout.peers[q],
            welcome.process,
            welcome.world,
            welcome.processes,
            layout.world,
            layout.processes()
        ))));
    }
    Ok(stream)
}

/// Tunes the established connections, starts their reader threads and hands out endpoints.
fn start_mesh(
    layout: Layout,
    streams: Vec<Option<TcpStream>>,
) -> Result<Vec<Arc<dyn Communicator>>, CommError> {
    let me = layout.process;
    let mut links = Vec::with_capacity(streams.len());
    let mut readers = Vec::new();
    for (q, stream) in streams.into_iter().enumerate() {
        let Some(stream) = stream else {
            links.push(None);
            continue;
        };
        let io_err = |context: &str| {
            let context = format!("{context} ({})", layout.describe(q));
            move |source| CommError::Io { context, source }
        };
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(io_err("configuring the connection"))?;
        tune_keepalive(&stream, &layout, q);
        let reader = stream
            .try_clone()
            .map_err(io_err("cloning the connection"))?;
        let control = stream
            .try_clone()
            .map_err(io_err("cloning the connection"))?;
        links.push(Some(Link {
            writer: Mutex::new(stream),
            control,
        }));
        readers.push((q, reader));
    }
    let shared = Arc::new(Shared {
        mailbox: Mailbox::new(layout.first_rank(me), layout.rpp),
        links,
        layout,
    });
    for (q, reader) in readers {
        let s = shared.clone();
        thread::Builder::new()
            .name(format!("dist-rx-p{q}"))
            .spawn(move || s.read_loop(q, reader))
            .map_err(|source| {
                shared.shutdown();
                CommError::Io {
                    context: "starting a connection reader thread".into(),
                    source,
                }
            })?;
    }
    tracing::info!(
        process = me,
        ranks = ?shared.layout.first_rank(me)..shared.layout.first_rank(me + 1),
        "rank group joined"
    );
    let mesh = Arc::new(Mesh { shared });
    let first = mesh.shared.layout.first_rank(me);
    Ok((first..first + mesh.shared.layout.rpp)
        .map(|rank| {
            Arc::new(TcpComm {
                rank,
                mesh: mesh.clone(),
            }) as Arc<dyn Communicator>
        })
        .collect())
}

/// Keepalive probes and a user timeout, so that a vanished host is noticed in tens of seconds
/// rather than hours. Best effort.
fn tune_keepalive(stream: &TcpStream, layout: &Layout, q: usize) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(3))
        .with_retries(4);
    let result = sock.set_tcp_keepalive(&ka).and_then(|()| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout(Some(Duration::from_secs(30)))?;
        Ok(())
    });
    if let Err(e) = result {
        tracing::warn!(process = layout.process, peer = q, error = %e, "could not enable TCP keepalive");
    }
}

/// One connection to another process.
#[derive(Debug)]
struct Link {
    /// Frames are written whole under this lock.
    writer: Mutex<TcpStream>,
    /// A handle for closing the socket without waiting for a writer.
    control: TcpStream,
}

/// State shared by the endpoints and the reader threads of one process.
#[derive(Debug)]
struct Shared {
    layout: Layout,
    mailbox: Mailbox,
    /// Indexed by process; `None` for this process.
    links: Vec<Option<Link>>,
}

/// What an abort notice reports.
struct Notice {
    rank: usize,
    addr: String,
    reason: String,
}

impl Shared {
    fn send(&self, src: usize, dst: usize, tag: Tag, data: &[u8]) -> Result<(), CommError> {
        if let Some(e) = self.mailbox.poisoned() {
            return Err(e);
        }
        if dst >= self.layout.world {
            return Err(CommError::InvalidArgument(format!(
                "send to rank {dst}, but the world has {} ranks",
                self.layout.world
            )));
        }
        if data.len() as u64 > MAX_FRAME_BYTES {
            return Err(CommError::InvalidArgument(format!(
                "message of {} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit",
                data.len()
            )));
        }
        let q = self.layout.process_of(dst);
        let Some(link) = self.links.get(q).and_then(Option::as_ref) else {
            // Same process: straight into the inbox.
            return self.mailbox.deliver(dst, src, tag, data.to_vec());
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + data.len());
        frame.extend_from_slice(&encode_header(
            wire_u32(src, "rank")?,
            wire_u32(dst, "rank")?,
            tag.to_byte(),
            data.len() as u64,
        ));
        frame.extend_from_slice(data);
        let written = {
            let mut w = link.writer.lock().unwrap_or_else(PoisonError::into_inner);
            w.write_all(&frame)
        };
        if let Err(e) = written {
            self.fail(q, format!("sending failed: {e}"));
            return Err(self
                .mailbox
                .poisoned()
                .unwrap_or_else(|| self.lost_error(q, e.to_string())));
        }
        Ok(())
    }

    fn lost_error(&self, q: usize, reason: String) -> CommError {
        CommError::PeerLost {
            rank: self.layout.first_rank(q),
            addr: self.layout.peers[q].clone(),
            reason,
        }
    }

    /// Reads frames from process `q` until the connection ends, then poisons the mesh.
    fn read_loop(&self, q: usize, mut stream: TcpStream) {
        let reason = match self.read_frames(q, &mut stream) {
            Ok(()) => return,
            Err(reason) => reason,
        };
        self.fail(q, reason);
    }

    /// `Ok(())` only when the mesh was already poisoned and reading can stop quietly.
    fn read_frames(&self, q: usize, stream: &mut TcpStream) -> Result<(), String> {
        let first = self.layout.first_rank(q);
        let senders = first..first + self.layout.rpp;
        loop {
            let mut h = [0u8; HEADER_LEN];
            match read_full(stream, &mut h) {
                Ok(true) => {}
                Ok(false) => return Err("connection closed by the peer".into()),
                Err(e) => return Err(format!("connection error: {e}")),
            }
            let src = le_u32(&h[0..4]) as usize;
            let dst = le_u32(&h[4..8]) as usize;
            let tag_byte = h[8];
            let len = le_u64(&h[9..17]);
            if len > MAX_FRAME_BYTES {
                return Err(format!(
                    "protocol violation: frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"
                ));
            }
            // Grows with what actually arrives, so a lying header cannot force a huge allocation.
            let mut payload = Vec::with_capacity(len.min(PREALLOCATE_MAX) as usize);
            match Read::by_ref(stream).take(len).read_to_end(&mut payload) {
                Ok(got) if got as u64 == len => {}
                Ok(_) => return Err("connection closed in the middle of a frame".into()),
                Err(e) => return Err(format!("connection error: {e}")),
            }
            if tag_byte == TAG_ABORT {
                let notice = decode_notice(src, &payload)
                    .ok_or_else(|| "protocol violation: malformed abort notice".to_string())?;
                self.poison_reported(q, notice);
                return Ok(());
            }
            let Some(tag) = Tag::from_byte(tag_byte) else {
                return Err(format!("protocol violation: unknown tag {tag_byte}"));
            };
            if !senders.contains(&src) {
                return Err(format!(
                    "protocol violation: frame claims source rank {src}, but that process hosts \
                     ranks {senders:?}"
                ));
            }
            if !self.mailbox.hosts(dst) {
                return Err(format!(
                    "protocol violation: frame for rank {dst}, which this process does not host"
                ));
            }
            if self.mailbox.deliver(dst, src, tag, payload).is_err() {
                // Poisoned meanwhile: whoever poisoned it closes the connections.
                return Ok(());
            }
        }
    }

    /// Process `q` told us that the group broke elsewhere.
    fn poison_reported(&self, q: usize, n: Notice) {
        let reason = if n.rank == self.layout.first_rank(q) {
            n.reason
        } else {
            format!("{} (reported by process {q})", n.reason)
        };
        if self.mailbox.poison(Poison::Lost {
            rank: n.rank,
            addr: n.addr.clone(),
            reason: reason.clone(),
        }) {
            tracing::error!(rank = n.rank, addr = %n.addr, reason = %reason, "peer lost; the group must restart");
            self.close_links(
                Some(&Notice {
                    rank: n.rank,
                    addr: n.addr,
                    reason,
                }),
                Some(q),
            );
        }
    }

    /// The connection to process `q` broke: poison the mesh and tell the others.
    fn fail(&self, q: usize, reason: String) {
        let rank = self.layout.first_rank(q);
        let addr = self.layout.peers[q].clone();
        if self.mailbox.poison(Poison::Lost {
            rank,
            addr: addr.clone(),
            reason: reason.clone(),
        }) {
            tracing::error!(rank, addr = %addr, reason = %reason, "peer lost; the group must restart");
            self.close_links(Some(&Notice { rank, addr, reason }), Some(q));
        }
    }

    /// Clean local stop.
    fn shutdown(&self) {
        if self.mailbox.poison(Poison::Shutdown) {
            let me = self.layout.process;
            tracing::info!(process = me, "closing the rank group connections");
            self.close_links(
                Some(&Notice {
                    rank: self.layout.first_rank(me),
                    addr: self.layout.peers[me].clone(),
                    reason: "the process shut down".into(),
                }),
                None,
            );
        }
    }

    /// Sends `notice` where the writer is free (skipping process `skip`) and closes every link.
    fn close_links(&self, notice: Option<&Notice>, skip: Option<usize>) {
        let frame = notice.and_then(encode_notice);
        for (q, link) in self.links.iter().enumerate() {
            let Some(link) = link else { continue };
            if let (Some(frame), true) = (&frame, Some(q) != skip) {
                // A writer stuck on a full socket must not hold up the close.
                let _ = link
                    .control
                    .set_write_timeout(Some(Duration::from_millis(500)));
                if let Ok(mut w) = link.writer.try_lock() {
                    let _ = w.write_all(frame);
                }
            }
            let _ = link.control.shutdown(Shutdown::Both);
        }
    }
}

fn encode_notice(n: &Notice) -> Option<Vec<u8>> {
    let addr = truncate_utf8(&n.addr, MAX_REASON_BYTES);
    let reason = truncate_utf8(&n.reason, MAX_REASON_BYTES);
    let mut payload = Vec::with_capacity(4 + addr.len() + reason.len());
    payload.extend_from_slice(&(addr.len() as u32).to_le_bytes());
    payload.extend_from_slice(addr.as_bytes());
    payload.extend_from_slice(reason.as_bytes());
    let rank = u32::try_from(n.rank).ok()?;
    let mut frame = encode_header(rank, 0, TAG_ABORT, payload.len() as u64).to_vec();
    frame.extend_from_slice(&payload);
    Some(frame)
}

fn decode_notice(rank: usize, payload: &[u8]) -> Option<Notice> {
    let addr_len = le_u32(payload.get(..4)?) as usize;
    let addr = payload.get(4..4usize.checked_add(addr_len)?)?;
    let reason = &payload[4 + addr_len..];
    Some(Notice {
        rank,
        addr: String::from_utf8_lossy(addr).into_owned(),
        reason: String::from_utf8_lossy(reason).into_owned(),
    })
}

/// Fills `buf`; `Ok(false)` on EOF before the first byte, an error on EOF after it.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                ))
            }
            Ok(k) => filled += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Owns the mesh of one process; dropping the last endpoint closes the connections.
#[derive(Debug)]
struct Mesh {
    shared: Arc<Shared>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

/// One rank of a group spread over processes connected by TCP. Made by [`join_tcp`].
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    mesh: Arc<Mesh>,
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.mesh.shared.layout.world
    }

    fn send(&self, to: usize, tag: Tag, data: &[u8]) -> Result<(), CommError> {
        self.mesh.shared.send(self.rank, to, tag, data)
    }

    fn recv(&self, from: usize, tag: Tag) -> Result<Vec<u8>, CommError> {
        let world = self.world();
        if from >= world {
            return Err(CommError::InvalidArgument(format!(
                "recv from rank {from}, but the world has {world} ranks"
            )));
        }
        self.mesh.shared.mailbox.take(self.rank, from, tag)
    }

    /// Closes this process's connections; every local rank's operations then fail with
    /// [`CommError::Shutdown`], and the other processes see this one as lost.
    fn shutdown(&self) {
        self.mesh.shared.shutdown();
    }
}
