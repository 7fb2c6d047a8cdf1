use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::tcp::{encode_header, Hello, Welcome, VERSION};
use super::*;

const JOIN: Duration = Duration::from_secs(8);

/// A deterministic, not-exactly-representable input for rank `r`, element `j`.
fn input(r: usize, j: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|k| {
            let x = ((r * 7919 + (j + k) * 104_729) % 2003) as f32;
            x * 0.013_7 - 13.1 + (r as f32) * 0.1
        })
        .collect()
}

fn sequential_sum(members: &[usize], len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    for &r in members {
        for (o, v) in out.iter_mut().zip(input(r, 0, len)) {
            *o += v;
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "element {i}: got {g}, want {w}"
        );
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `f(endpoint)` on one thread per endpoint; results in endpoint order.
fn on_threads<T: Send + 'static>(
    comms: Vec<Arc<dyn Communicator>>,
    f: impl Fn(Arc<dyn Communicator>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            thread::spawn(move || f(c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// All-reduces over `group` (each rank in the group) for every length, returning per-rank
/// results keyed by (length index).
fn check_all_reduce(comms: Vec<Arc<dyn Communicator>>, groups: Vec<Vec<usize>>) {
    let lens = [0usize, 1, 3, 1000];
    let groups = Arc::new(groups);
    let g2 = groups.clone();
    let results = on_threads(comms, move |c| {
        let group = g2.iter().find(|g| g.contains(&c.rank())).cloned();
        let Some(group) = group else {
            return (c.rank(), Vec::new());
        };
        let mut out = Vec::new();
        for &len in &lens {
            let mut v = input(c.rank(), 0, len);
            c.all_reduce_sum(&group, &mut v).unwrap();
            // Same inputs again: same bits.
            let mut again = input(c.rank(), 0, len);
            c.all_reduce_sum(&group, &mut again).unwrap();
            assert_eq!(
                bits(&v),
                bits(&again),
                "rank {} not deterministic",
                c.rank()
            );
            out.push(v);
        }
        (c.rank(), out)
    });
    for group in groups.iter() {
        for (li, &len) in lens.iter().enumerate() {
            let want = sequential_sum(group, len);
            let mut first: Option<Vec<u32>> = None;
            for (rank, out) in &results {
                if !group.contains(rank) {
                    continue;
                }
                assert_close(&out[li], &want);
                match &first {
                    None => first = Some(bits(&out[li])),
                    Some(b) => assert_eq!(b, &bits(&out[li]), "members differ, len {len}"),
                }
            }
        }
    }
}

fn check_all_gather(comms: Vec<Arc<dyn Communicator>>, group: Vec<usize>) {
    let lens = [0usize, 1, 3, 1000];
    let len_of = move |r: usize| lens[r % lens.len()];
    let g = group.clone();
    let results = on_threads(comms, move |c| {
        if !g.contains(&c.rank()) {
            return None;
        }
        Some(
            c.all_gather(&g, &input(c.rank(), 5, len_of(c.rank())))
                .unwrap(),
        )
    });
    let want: Vec<f32> = group.iter().flat_map(|&r| input(r, 5, len_of(r))).collect();
    for out in results.into_iter().flatten() {
        assert_eq!(bits(&out), bits(&want));
    }
}

#[test]
fn local_all_reduce_whole_group_and_subgroups() {
    check_all_reduce(local_group(4), vec![vec![0, 1, 2, 3]]);
    // Two disjoint subgroups at once, one in reverse order.
    check_all_reduce(local_group(4), vec![vec![1, 3], vec![2, 0]]);
}

#[test]
fn local_all_gather_unequal_lengths() {
    check_all_gather(local_group(4), vec![0, 1, 2, 3]);
    check_all_gather(local_group(4), vec![3, 1]);
}

#[test]
fn group_of_one_is_a_no_op() {
    let comms = local_group(2);
    let mut v = vec![1.5f32, -2.0];
    comms[1].all_reduce_sum(&[1], &mut v).unwrap();
    assert_eq!(v, vec![1.5, -2.0]);
    assert_eq!(comms[1].all_gather(&[1], &v).unwrap(), v);
}

#[test]
fn bad_groups_are_rejected() {
    let comms = local_group(3);
    let mut v = vec![1.0f32];
    for group in [&[1usize, 2][..], &[0, 0, 1], &[0, 7]] {
        let err = comms[0].all_reduce_sum(group, &mut v).unwrap_err();
        assert!(
            matches!(err, CommError::InvalidArgument(_)),
            "{group:?}: {err}"
        );
    }
    assert!(matches!(
        comms[0].send(3, Tag::Control, b"x"),
        Err(CommError::InvalidArgument(_))
    ));
}

#[test]
fn local_send_recv_is_fifo_per_tag() {
    let comms = local_group(2);
    for i in 0..5u8 {
        comms[0].send(1, Tag::Control, &[i]).unwrap();
        comms[0].send(1, Tag::Activation, &[100 + i]).unwrap();
    }
    comms[0].send_f32(1, Tag::Logits, &[1.0, -0.5]).unwrap();
    assert_eq!(comms[1].recv_f32(0, Tag::Logits).unwrap(), vec![1.0, -0.5]);
    for i in 0..5u8 {
        assert_eq!(comms[1].recv(0, Tag::Activation).unwrap(), vec![100 + i]);
    }
    for i in 0..5u8 {
        assert_eq!(comms[1].recv(0, Tag::Control).unwrap(), vec![i]);
    }
}

#[test]
fn recv_f32_rejects_odd_lengths() {
    let comms = local_group(2);
    comms[0].send(1, Tag::Logits, &[1, 2, 3]).unwrap();
    assert!(matches!(
        comms[1].recv_f32(0, Tag::Logits),
        Err(CommError::Protocol(_))
    ));
}

#[test]
fn local_shutdown_wakes_blocked_receivers() {
    let comms = local_group(2);
    let c1 = comms[1].clone();
    let waiter = thread::spawn(move || c1.recv(0, Tag::Control));
    thread::sleep(Duration::from_millis(50));
    comms[0].shutdown();
    assert!(matches!(waiter.join().unwrap(), Err(CommError::Shutdown)));
}

// ---- TCP ----

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers = ls
        .iter()
        .map(|l| format!("127.0.0.1:{}", l.local_addr().unwrap().port()))
        .collect();
    (ls, peers)
}

/// A port that was free a moment ago (for processes that bind it themselves, later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Joins every process of a group on its own thread; endpoints of all processes, in rank order.
fn join_all(world: usize, delays: &[Duration]) -> Vec<Arc<dyn Communicator>> {
    let (ls, peers) = listeners(delays.len());
    let handles: Vec<_> = ls
        .into_iter()
        .zip(delays.iter().copied())
        .enumerate()
        .map(|(p, (l, delay))| {
            let peers = peers.clone();
            thread::spawn(move || {
                thread::sleep(delay);
                join_tcp_with_listener(l, &peers, p, world, JOIN).unwrap()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn tcp_two_processes_one_rank_each() {
    let comms = join_all(2, &[Duration::ZERO, Duration::ZERO]);
    assert_eq!(comms.len(), 2);
    assert_eq!((comms[0].rank(), comms[1].rank()), (0, 1));
    assert_eq!(comms[1].world(), 2);
    for i in 0..10u8 {
        comms[0].send(1, Tag::Control, &[i]).unwrap();
        comms[0].send(1, Tag::Activation, &vec![i; 70_000]).unwrap();
    }
    comms[1].send(0, Tag::Logits, b"back").unwrap();
    comms[0].send(1, Tag::Control, &[]).unwrap();
    for i in 0..10u8 {
        assert_eq!(comms[1].recv(0, Tag::Activation).unwrap(), vec![i; 70_000]);
    }
    for i in 0..10u8 {
        assert_eq!(comms[1].recv(0, Tag::Control).unwrap(), vec![i]);
    }
    assert_eq!(comms[1].recv(0, Tag::Control).unwrap(), Vec::<u8>::new());
    assert_eq!(comms[0].recv(1, Tag::Logits).unwrap(), b"back".to_vec());
    check_all_reduce(comms.clone(), vec![vec![0, 1]]);
    check_all_gather(comms.clone(), vec![1, 0]);
    drop(comms);
}

#[test]
fn tcp_two_processes_two_ranks_each_one_late() {
    // Process 1 binds its own port 1.2 s after process 0 started: process 0's connects and
    // process 1's join must both cope.
    let peers: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let handles: Vec<_> = (0..2)
        .map(|p| {
            let peers = peers.clone();
            thread::spawn(move || {
                if p == 1 {
                    thread::sleep(Duration::from_millis(1200));
                }
                join_tcp(&peers, p, 4, JOIN).unwrap()
            })
        })
        .collect();
    let comms: Vec<Arc<dyn Communicator>> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(
        comms.iter().map(|c| c.rank()).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // Same process (0 -> 1) and across processes (1 -> 2, 3 -> 0), FIFO per tag.
    for (from, to) in [(0usize, 1usize), (1, 2), (3, 0)] {
        for i in 0..5u8 {
            comms[from].send(to, Tag::Activation, &[i, 1]).unwrap();
            comms[from].send(to, Tag::Control, &[i, 2]).unwrap();
        }
    }
    for (from, to) in [(0usize, 1usize), (1, 2), (3, 0)] {
        for i in 0..5u8 {
            assert_eq!(comms[to].recv(from, Tag::Control).unwrap(), vec![i, 2]);
        }
        for i in 0..5u8 {
            assert_eq!(comms[to].recv(from, Tag::Activation).unwrap(), vec![i, 1]);
        }
    }
    check_all_reduce(comms.clone(), vec![vec![0, 1, 2, 3]]);
    // Tensor groups across processes and within one.
    check_all_reduce(comms.clone(), vec![vec![0, 2], vec![3, 1]]);
    check_all_reduce(comms.clone(), vec![vec![0, 1], vec![2, 3]]);
    check_all_gather(comms.clone(), vec![0, 1, 2, 3]);
    drop(comms);
}

#[test]
fn tcp_lost_peer_fails_blocked_and_later_calls() {
    let mut comms = join_all(4, &[Duration::ZERO, Duration::ZERO]);
    let p1: Vec<_> = comms.drain(2..).collect();
    let waiters: Vec<_> = comms
        .iter()
        .map(|c| {
            let c = c.clone();
            thread::spawn(move || {
                let t = Instant::now();
                (c.recv(2, Tag::Control), t.elapsed())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    drop(p1); // the last endpoints of process 1: its connections close
    for w in waiters {
        let (res, waited) = w.join().unwrap();
        match res {
            Err(CommError::PeerLost { rank, addr, .. }) => {
                assert_eq!(rank, 2);
                assert!(addr.starts_with("127.0.0.1:"));
            }
            other => panic!("expected PeerLost, got {other:?}"),
        }
        assert!(waited < Duration::from_secs(3), "took {waited:?}");
    }
    // Everything afterwards fails the same way, local traffic included.
    assert!(matches!(
        comms[0].send(1, Tag::Control, b"x"),
        Err(CommError::PeerLost { rank: 2, .. })
    ));
    assert!(matches!(
        comms[1].recv(0, Tag::Control),
        Err(CommError::PeerLost { rank: 2, .. })
    ));
    let msg = comms[0]
        .send(3, Tag::Control, b"x")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rank 2 (127.0.0.1:"), "{msg}");
    assert!(msg.contains("the group must restart"), "{msg}");
}

#[test]
fn tcp_shutdown_is_reported_to_the_other_side() {
    let comms = join_all(2, &[Duration::ZERO, Duration::ZERO]);
    let c0 = comms[0].clone();
    let waiter = thread::spawn(move || c0.recv(1, Tag::Logits));
    thread::sleep(Duration::from_millis(50));
    comms[1].shutdown();
    assert!(matches!(
        comms[1].recv(0, Tag::Control),
        Err(CommError::Shutdown)
    ));
    match waiter.join().unwrap() {
        Err(CommError::PeerLost {
            rank: 1, reason, ..
        }) => {
            assert!(reason.contains("shut down"), "{reason}")
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
}

#[test]
fn tcp_messages_sent_before_the_peer_stops_still_arrive() {
    let mut comms = join_all(2, &[Duration::ZERO, Duration::ZERO]);
    let last = comms.pop().unwrap();
    last.send(0, Tag::Control, b"stop").unwrap();
    last.send_f32(0, Tag::Logits, &[3.5]).unwrap();
    drop(last); // process 1's last endpoint: it closes its connections
    assert_eq!(comms[0].recv(1, Tag::Control).unwrap(), b"stop".to_vec());
    assert_eq!(comms[0].recv_f32(1, Tag::Logits).unwrap(), vec![3.5]);
    assert!(matches!(
        comms[0].recv(1, Tag::Control),
        Err(CommError::PeerLost { rank: 1, .. })
    ));
}

/// Plays process 1 of a 2-process, 2-rank group by hand: handshakes, then runs `then`.
fn fake_peer(then: impl FnOnce(TcpStream) + Send + 'static) -> Vec<Arc<dyn Communicator>> {
    let (mut ls, peers) = listeners(2);
    drop(ls.pop());
    let l0 = ls.pop().unwrap();
    let addr0 = peers[0].clone();
    let join = thread::spawn(move || join_tcp_with_listener(l0, &peers, 0, 2, JOIN));
    let mut s = TcpStream::connect(&addr0).unwrap();
    let hello = Hello {
        version: VERSION,
        process: 1,
        world: 2,
        processes: 2,
        target: 0,
    };
    s.write_all(&hello.encode()).unwrap();
    let welcome = Welcome::read(&mut s).unwrap().unwrap();
    assert_eq!((welcome.status, welcome.process), (0, 0));
    let comms = join.join().unwrap().unwrap();
    then(s);
    comms
}

#[test]
fn tcp_raw_peer_that_closes_is_lost() {
    let comms = fake_peer(|mut s| {
        // A good frame first: it is delivered.
        s.write_all(&encode_header(1, 0, 0, 2)).unwrap();
        s.write_all(b"hi").unwrap();
        thread::sleep(Duration::from_millis(100));
        drop(s);
    });
    // The frame that arrived before the close is still delivered; then the loss shows.
    let t = Instant::now();
    assert_eq!(comms[0].recv(1, Tag::Control).unwrap(), b"hi".to_vec());
    let res = comms[0].recv(1, Tag::Control);
    assert!(
        matches!(res, Err(CommError::PeerLost { rank: 1, .. })),
        "{res:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn tcp_malformed_frames_poison_the_mesh() {
    type Frame = ([u8; 17], &'static str);
    let cases: [Frame; 4] = [
        (encode_header(1, 0, 0, u64::MAX), "exceeds"),
        (encode_header(1, 0, 9, 0), "unknown tag"),
        (encode_header(0, 0, 0, 0), "source rank"),
        (encode_header(1, 5, 0, 0), "does not host"),
    ];
    for (header, expect) in cases {
        let comms = fake_peer(move |mut s| {
            s.write_all(&header).unwrap();
            // Keep the socket open: the failure must come from the frame itself.
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink);
        });
        match comms[0].recv(1, Tag::Control) {
            Err(CommError::PeerLost {
                rank: 1, reason, ..
            }) => {
                assert!(reason.contains(expect), "{reason} lacks {expect}")
            }
            other => panic!("expected PeerLost, got {other:?}"),
        }
    }
}

#[test]
fn tcp_truncated_frame_is_lost_not_a_hang() {
    let comms = fake_peer(|mut s| {
        s.write_all(&encode_header(1, 0, 0, 10)).unwrap();
        s.write_all(b"abc").unwrap();
        drop(s);
    });
    match comms[0].recv(1, Tag::Control) {
        Err(CommError::PeerLost {
            rank: 1, reason, ..
        }) => {
            assert!(reason.contains("middle of a frame"), "{reason}")
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
}

#[test]
fn tcp_world_mismatch_fails_both_sides() {
    let (mut ls, peers) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let p = peers.clone();
    let t = Instant::now();
    let a = thread::spawn(move || join_tcp_with_listener(l0, &p, 0, 2, JOIN));
    let b = thread::spawn(move || join_tcp_with_listener(l1, &peers, 1, 4, JOIN));
    for res in [a.join().unwrap(), b.join().unwrap()] {
        match res {
            Err(CommError::Layout(msg)) => {
                assert!(msg.contains("world of 4 ranks"), "{msg}");
                assert!(msg.contains("world of 2 ranks"), "{msg}");
            }
            other => panic!("expected a layout error, got {other:?}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn tcp_stray_connections_do_not_break_the_join() {
    let (ls, peers) = listeners(2);
    let mut stray = TcpStream::connect(&peers[0]).unwrap();
    stray
        .write_all(b"GET / HTTP/1.1\r\n\r\n____________")
        .unwrap();
    let mut it = ls.into_iter();
    let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
    let p = peers.clone();
    let a = thread::spawn(move || join_tcp_with_listener(l0, &p, 0, 2, JOIN).unwrap());
    let b = thread::spawn(move || join_tcp_with_listener(l1, &peers, 1, 2, JOIN).unwrap());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    a[0].send(1, Tag::Control, b"ok").unwrap();
    assert_eq!(b[0].recv(0, Tag::Control).unwrap(), b"ok".to_vec());
}

#[test]
fn join_timeout_names_the_missing_peer() {
    // Process 0 waits for process 1, which never comes...
    let (mut ls, peers) = listeners(2);
    drop(ls.pop());
    let l0 = ls.pop().unwrap();
    let t = Instant::now();
    let err = join_tcp_with_listener(l0, &peers, 0, 2, Duration::from_millis(400)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    let msg = err.to_string();
    assert!(matches!(err, CommError::JoinTimeout { .. }), "{msg}");
    assert!(msg.contains(&format!("{} (process 1", peers[1])), "{msg}");
    assert!(msg.contains("check --peers"), "{msg}");

    // ...and process 1 cannot reach process 0.
    let (mut ls, peers) = listeners(2);
    let l1 = ls.pop().unwrap();
    drop(ls.pop());
    let err = join_tcp_with_listener(l1, &peers, 1, 2, Duration::from_millis(400)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("{} (process 0", peers[0])), "{msg}");
}

#[test]
fn layout_errors_are_clear() {
    let peers: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let err = join_tcp(&peers, 0, 4, JOIN).unwrap_err().to_string();
    assert!(
        err.contains("--peers has 3 entries but the world of 4 ranks does not divide evenly"),
        "{err}"
    );
    let err = join_tcp(&peers, 3, 3, JOIN).unwrap_err();
    assert!(matches!(err, CommError::Layout(_)), "{err}");
    let bad = vec!["127.0.0.1:1".to_string(), "nohost".to_string()];
    let err = join_tcp(&bad, 0, 2, JOIN).unwrap_err().to_string();
    assert!(err.contains("not HOST:PORT"), "{err}");
    let dup = vec!["127.0.0.1:1".to_string(), "127.0.0.1:1".to_string()];
    let err = join_tcp(&dup, 0, 2, JOIN).unwrap_err().to_string();
    assert!(err.contains("twice"), "{err}");
}

#[test]
fn one_peer_is_the_local_group() {
    let comms = join_tcp(&["127.0.0.1:1".to_string()], 0, 3, JOIN).unwrap();
    assert_eq!(comms.len(), 3);
    check_all_reduce(comms, vec![vec![0, 1, 2]]);
}

#[cfg(feature = "cuda")]
#[test]
fn nccl_without_a_gpu_is_unavailable_not_a_panic() {
    let host = local_group(1).remove(0);
    match NcclComm::bootstrap(host, &[0], 0) {
        Ok(c) => {
            // A machine with a GPU and NCCL: the collective must work.
            let mut v = vec![1.0f32, 2.0];
            c.all_reduce_sum(&[0], &mut v).unwrap();
            assert_eq!(v, vec![1.0, 2.0]);
        }
        Err(CommError::Unavailable(msg)) => {
            eprintln!("NCCL unavailable here: {msg}");
            assert!(!msg.is_empty())
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
    }
}
