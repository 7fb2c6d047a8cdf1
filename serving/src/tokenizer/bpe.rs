//! Byte-level BPE (GPT-2 family): bytes are mapped to printable characters, then adjacent
//! symbols are merged in rank order.

use std::collections::HashMap;

/// GPT-2's reversible byte → char table: printable bytes map to themselves, the rest to
/// code points from 256 upwards.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).expect("valid code point");
            n += 1;
            c
        };
    }
    table
}

/// The merge table over token ids.
#[derive(Debug)]
pub struct Bpe {
    /// (left, right) → (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token id of each mapped byte.
    byte_ids: [Option<u32>; 256],
}

impl Bpe {
    pub fn new(
        vocab: &HashMap<String, u32>,
        merges: &[(String, String)],
        bytes: &[char; 256],
    ) -> Self {
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(&ia), Some(&ib), Some(&im)) =
                (vocab.get(a), vocab.get(b), vocab.get(&format!("{a}{b}")))
            else {
                continue;
            };
            table.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let mut byte_ids = [None; 256];
        for (b, c) in bytes.iter().enumerate() {
            byte_ids[b] = vocab.get(&c.to_string()).copied();
        }
        Self {
            merges: table,
            byte_ids,
        }
    }

    /// Encodes one pre-tokenized piece.
    pub fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_ids[b as usize])
            .collect();
        loop {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend(syms);
    }
}
