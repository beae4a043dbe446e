//! The snapshot file: a magic, the primary's `Follow` messages as frames,
//! and a trailer with the checkpoint and a SHA-256 of everything before
//! the digest.
//!
//! ```text
//! magic    8 bytes  "DSSNAP\0" + format version (1)
//! frame*   u32 BE length (> 0) + an encoded FollowResponse
//! end      u32 BE 0
//! trailer  u64 BE checkpoint, u64 BE frame count
//! digest   32 bytes: SHA-256 of every byte above
//! ```
//!
//! A file is read twice: once to check it whole (lengths, trailer, digest,
//! nothing after it) before anything is written, then to apply it.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb;

/// The first bytes of every snapshot file (the last one is the format).
const MAGIC: [u8; 8] = *b"DSSNAP\x00\x01";
/// The largest frame: as the largest message a replica takes.
pub const MAX_FRAME: usize = 256 << 20;

/// What is wrong with a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a snapshot, or a damaged one.
    #[error("{0}")]
    Corrupt(String),
}

/// What a whole snapshot file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// The checkpoint the store was copied at.
    pub checkpoint: u64,
    /// How many messages it holds.
    pub frames: u64,
}

/// Writes a snapshot file frame by frame, hashing as it goes.
pub struct FrameWriter {
    /// The file.
    out: BufWriter<File>,
    /// The digest of everything written.
    hash: Sha256,
    /// Frames written.
    frames: u64,
    /// Bytes written.
    bytes: u64,
}

impl FrameWriter {
    /// Starts a snapshot in `file` (which must be new).
    pub fn create(path: &Path) -> Result<Self, FileError> {
        let file = File::options().write(true).create_new(true).open(path)?;
        let mut writer = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            frames: 0,
            bytes: 0,
        };
        writer.put(&MAGIC)?;
        Ok(writer)
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends one message.
    pub fn frame(&mut self, message: &pb::FollowResponse) -> Result<(), FileError> {
        let body = message.encode_to_vec();
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&n| n > 0 && body.len() <= MAX_FRAME)
            .ok_or_else(|| {
                FileError::Corrupt(format!(
                    "a message of {} bytes cannot be framed",
                    body.len()
                ))
            })?;
        self.put(&len.to_be_bytes())?;
        self.put(&body)?;
        self.frames += 1;
        Ok(())
    }

    /// Writes the trailer and the digest, and makes the file durable.
    pub fn finish(mut self, checkpoint: u64) -> Result<Trailer, FileError> {
        self.put(&0u32.to_be_bytes())?;
        self.put(&checkpoint.to_be_bytes())?;
        let frames = self.frames;
        self.put(&frames.to_be_bytes())?;
        let digest = self.hash.finalize();
        self.out.write_all(&digest)?;
        let file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(Trailer { checkpoint, frames })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        self.bytes += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        Ok(())
    }
}

/// Reads a snapshot file's frames in order.
pub struct FrameReader {
    /// The file.
    input: BufReader<File>,
    /// The digest of everything read.
    hash: Sha256,
}

impl FrameReader {
    /// Opens `path` and checks its magic.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let file = File::open(path)?;
        let mut reader = Self {
            input: BufReader::with_capacity(1 << 20, file),
            hash: Sha256::new(),
        };
        let mut magic = [0; 8];
        reader.exact(&mut magic, "its header")?;
        if magic[..7] != MAGIC[..7] {
            return Err(FileError::Corrupt("not a deltasync snapshot".into()));
        }
        if magic[7] != MAGIC[7] {
            return Err(FileError::Corrupt(format!(
                "snapshot format {} is not supported (this version reads {})",
                magic[7], MAGIC[7]
            )));
        }
        Ok(reader)
    }

    /// The next message, or `None` at the end marker.
    pub fn next_frame(&mut self) -> Result<Option<pb::FollowResponse>, FileError> {
        let mut len = [0; 4];
        self.exact(&mut len, "a frame")?;
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len == 0 {
            return Ok(None);
        }
        if len > MAX_FRAME {
            return Err(FileError::Corrupt(format!(
                "a frame of {len} bytes is larger than any snapshot writes"
            )));
        }
        let mut body = vec![0; len];
        self.exact(&mut body, "a frame")?;
        pb::FollowResponse::decode(body.as_slice())
            .map(Some)
            .map_err(|e| FileError::Corrupt(format!("a frame does not decode: {e}")))
    }

    /// After the end marker: the trailer, checked against the digest, and
    /// that nothing follows it.
    pub fn trailer(mut self) -> Result<Trailer, FileError> {
        let mut words = [0; 16];
        self.exact(&mut words, "its trailer")?;
        let expected = self.hash.finalize();
        let mut digest = [0; 32];
        self.input
            .read_exact(&mut digest)
            .map_err(|e| truncated(e, "its checksum"))?;
        if digest[..] != expected[..] {
            return Err(FileError::Corrupt(
                "checksum mismatch: the file was damaged".into(),
            ));
        }
        let mut rest = [0; 1];
        if self.input.read(&mut rest)? != 0 {
            return Err(FileError::Corrupt("bytes after the checksum".into()));
        }
        let (checkpoint, frames) = words.split_at(8);
        Ok(Trailer {
            checkpoint: u64::from_be_bytes(checkpoint.try_into().unwrap_or_default()),
            frames: u64::from_be_bytes(frames.try_into().unwrap_or_default()),
        })
    }

    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), FileError> {
        self.input.read_exact(buf).map_err(|e| truncated(e, what))?;
        self.hash.update(&*buf);
        Ok(())
    }
}

/// An early end of file is a truncated snapshot.
fn truncated(e: io::Error, what: &str) -> FileError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FileError::Corrupt(format!("truncated: the file ends inside {what}"))
    } else {
        FileError::Io(e)
    }
}

/// Reads a whole file once: checks every frame decodes, the frame count,
/// the trailer and the digest. Returns the trailer and the first message
/// (the primary's hello).
pub fn verify(path: &Path) -> Result<(Trailer, pb::FollowHello), FileError> {
    let mut reader = FrameReader::open(path)?;
    let mut hello = None;
    let mut frames = 0u64;
    while let Some(frame) = reader.next_frame()? {
        if frames == 0 {
            match frame.response {
                Some(pb::follow_response::Response::Hello(h)) => hello = Some(h),
                _ => return Err(FileError::Corrupt("it does not start with a hello".into())),
            }
        }
        frames += 1;
    }
    let trailer = reader.trailer()?;
    if trailer.frames != frames {
        return Err(FileError::Corrupt(format!(
            "the trailer counts {} messages, the file holds {frames}",
            trailer.frames
        )));
    }
    let hello = hello.ok_or_else(|| FileError::Corrupt("it holds no message".into()))?;
    Ok((trailer, hello))
}
