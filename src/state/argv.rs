//! [`Argv`]: a task's command line in one allocation.
//!
//! A command kept as `Vec<String>` costs a vector plus one allocation per argument: for a
//! typical six-argument command, about 380 bytes of heap per retained task, five times the
//! text itself. `Argv` keeps the arguments in one boxed buffer, each prefixed by its length
//! (LEB128), so any byte sequence of valid UTF-8 (a NUL too) round-trips. It serializes as a
//! sequence of strings, exactly as `Vec<String>` did, so snapshots, log entries and JSON are
//! unchanged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A program and its arguments (`argv[0]` first).
#[derive(Clone, PartialEq, Eq, Default, Hash)]
pub struct Argv {
    /// For each argument: its length in bytes as LEB128, then its bytes.
    buf: Box<[u8]>,
}

impl Argv {
    /// The arguments, in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { rest: &self.buf }
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The program (the first argument), `""` when there is none.
    pub fn program(&self) -> &str {
        self.iter().next().unwrap_or("")
    }

    /// The arguments after the program.
    pub fn args(&self) -> Iter<'_> {
        let mut it = self.iter();
        it.next();
        it
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(String::from).collect()
    }

    /// Bytes of all the arguments together.
    pub fn text_len(&self) -> usize {
        self.iter().map(str::len).sum()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Argv {
    fn from_iter<I: IntoIterator<Item = S>>(args: I) -> Argv {
        let mut buf = Vec::new();
        for a in args {
            let a = a.as_ref().as_bytes();
            let mut n = a.len();
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    buf.push(byte);
                    break;
                }
                buf.push(byte | 0x80);
            }
            buf.extend_from_slice(a);
        }
        Argv {
            buf: buf.into_boxed_slice(),
        }
    }
}

impl From<Vec<String>> for Argv {
    fn from(v: Vec<String>) -> Argv {
        v.iter().collect()
    }
}

impl<const N: usize> From<[&str; N]> for Argv {
    fn from(v: [&str; N]) -> Argv {
        v.iter().collect()
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Argv {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.iter().eq(other.iter().copied())
    }
}

impl PartialEq<Vec<String>> for Argv {
    fn eq(&self, other: &Vec<String>) -> bool {
        self.iter().eq(other.iter().map(String::as_str))
    }
}

/// The arguments of an [`Argv`].
#[derive(Clone)]
pub struct Iter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let (mut n, mut shift, mut i) = (0usize, 0, 0);
        loop {
            let b = self.rest[i];
            n |= usize::from(b & 0x7f) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let (arg, rest) = self.rest[i..].split_at(n);
        self.rest = rest;
        // Built from `&str`s only (FromIterator), each cut at its own boundaries.
        Some(std::str::from_utf8(arg).expect("Argv holds whole UTF-8 arguments"))
    }
}

impl<'a> IntoIterator for &'a Argv {
    type Item = &'a str;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl std::fmt::Debug for Argv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Argv {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        // With its length first, as bincode needs (and as a Vec<String> was written).
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for a in self.iter() {
            seq.serialize_element(a)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Argv, D::Error> {
        Vec::<String>::deserialize(d).map(Argv::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_whatever_they_hold() {
        let long = "x".repeat(70_000);
        let cases: Vec<Vec<String>> = vec![
            vec![],
            vec!["".into()],
            vec!["".into(), "".into()],
            vec!["sh".into(), "-c".into(), "echo 'a b'\n".into()],
            vec![
                "nul\0inside".into(),
                "é∂😀".into(),
                long.clone(),
                "x".repeat(127),
            ],
            vec!["x".repeat(128), "y".repeat(16_383), "z".repeat(16_384)],
        ];
        for v in cases {
            let a = Argv::from(v.clone());
            assert_eq!(a.to_vec(), v);
            assert_eq!(a.len(), v.len());
            assert_eq!(a.is_empty(), v.is_empty());
            assert_eq!(a.program(), v.first().map_or("", String::as_str));
            assert_eq!(a.args().count(), v.len().saturating_sub(1));
            assert!(a == v);
        }
    }

    /// Snapshots and log entries written with `Vec<String>` read as `Argv`, and back.
    #[test]
    fn it_encodes_exactly_as_a_vector_of_strings() {
        let v: Vec<String> = vec!["python3".into(), "job.py".into(), "--date".into()];
        let cfg = bincode::config::standard();
        let old = bincode::serde::encode_to_vec(&v, cfg).unwrap();
        let a: Argv = bincode::serde::decode_from_slice(&old, cfg).unwrap().0;
        assert!(a == v);
        assert_eq!(bincode::serde::encode_to_vec(&a, cfg).unwrap(), old);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&v).unwrap()
        );
        assert_eq!(format!("{a:?}"), format!("{v:?}"));
    }
}
