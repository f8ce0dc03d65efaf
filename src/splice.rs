//! Large response bodies moved socket to socket inside the kernel, without copying them
//! through the proxy's memory: `splice(2)` from the upstream's TCP socket into a pipe and from
//! the pipe into the client's (HAProxy's `option splice-response` does the same).
//!
//! Used only where the bytes pass unchanged: a body with a Content-Length, both sockets plain
//! TCP (not TLS: an HTTPS upstream's bytes are decrypted in user space anyway), nothing of the
//! body left in the proxy's buffers, and at least [`MIN`] bytes to go. Everywhere else, and on
//! systems without `splice(2)`, bodies are read and written as usual. Request bodies are always
//! copied: spliced, uploads were no faster and no cheaper. BENCHMARKS.md has the measurements.

use std::io;
use std::task::{ready, Context, Poll};

use tokio::net::TcpStream;

/// Bodies with fewer bytes left than this are copied as usual: a pipe costs two file
/// descriptors and four system calls to set up and close, worth it only for large transfers.
pub const MIN: u64 = 256 * 1024;

/// A body that can be moved with [`poll_copy`]: fills the pipe from its socket.
pub trait Source {
    type Error;
    /// Moves up to what is left of the body from its socket into `pipe` (empty when called).
    /// Ready(Ok(0)): the body is over; Pending: waiting for the sender (the task is woken).
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut Pipe,
    ) -> Poll<Result<usize, Self::Error>>;
}

/// Why [`poll_copy`] stopped early.
#[derive(Debug)]
pub enum CopyError<E> {
    /// The body's sender failed (cut short, timed out, broke the framing).
    Source(E),
    /// The destination socket failed.
    Destination(io::Error),
}

/// Moves the rest of `body` into `dst` through `pipe`, adding the bytes delivered to `moved`
/// (kept by the caller across polls). Ready(Ok) when the body is over and the pipe empty.
pub fn poll_copy<S: Source>(
    cx: &mut Context<'_>,
    pipe: &mut Pipe,
    body: &mut S,
    dst: &TcpStream,
    moved: &mut u64,
) -> Poll<Result<(), CopyError<S::Error>>> {
    loop {
        if pipe.held() > 0 {
            match ready!(pipe.poll_drain(cx, dst)) {
                Ok(n) => *moved += n as u64,
                Err(e) => return Poll::Ready(Err(CopyError::Destination(e))),
            }
            continue;
        }
        match ready!(body.poll_fill(cx, pipe)) {
            Ok(0) => return Poll::Ready(Ok(())),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(CopyError::Source(e))),
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use rustix::fd::OwnedFd;
    use rustix::pipe::{PipeFlags, SpliceFlags};
    use tokio::io::Interest;

    /// The pipe a transfer goes through, and how much of it is in the pipe.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Bytes taken from the source, not yet given to the destination.
        held: usize,
        capacity: usize,
    }

    impl Pipe {
        /// A non-blocking pipe, enlarged to 1 MiB when the system allows (the default,
        /// 64 KiB, would take sixteen times the system calls per byte).
        pub fn new() -> io::Result<Pipe> {
            let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            let capacity = rustix::pipe::fcntl_setpipe_size(&write, 1 << 20).unwrap_or(64 * 1024);
            Ok(Pipe {
                read,
                write,
                held: 0,
                capacity,
            })
        }

        /// Moves up to `*left` bytes from `src` into the pipe,
        /// decrementing `*left`. Ready(Ok(0)): `src` is at end of stream. Called only with an
        /// empty pipe, so a would-block is the socket's, never the pipe's, and the readiness
        /// tokio clears is the right one.
        pub fn poll_fill(
            &mut self,
            cx: &mut Context<'_>,
            src: &TcpStream,
            left: &mut u64,
        ) -> Poll<io::Result<usize>> {
            debug_assert_eq!(self.held, 0);
            let want = (*left).min(self.capacity as u64) as usize;
            if want == 0 {
                return Poll::Ready(Ok(0));
            }
            loop {
                ready!(src.poll_read_ready(cx))?;
                match src.try_io(Interest::READABLE, || {
                    splice(src, &self.write, want).map_err(io::Error::from)
                }) {
                    Ok(n) => {
                        self.held += n;
                        *left -= n as u64;
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }

        /// Moves what the pipe holds into `dst`, as much as the socket takes now.
        pub fn poll_drain(
            &mut self,
            cx: &mut Context<'_>,
            dst: &TcpStream,
        ) -> Poll<io::Result<usize>> {
            loop {
                ready!(dst.poll_write_ready(cx))?;
                let held = self.held;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(&self.read, dst, held).map_err(io::Error::from)
                }) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.held -= n;
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }

        /// Bytes taken from the source that have not reached the destination.
        pub fn held(&self) -> usize {
            self.held
        }
    }

    fn splice(
        from: impl rustix::fd::AsFd,
        to: impl rustix::fd::AsFd,
        len: usize,
    ) -> rustix::io::Result<usize> {
        rustix::pipe::splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
        )
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    /// Without `splice(2)` no pipe can be made, and bodies are copied as usual.
    pub struct Pipe(());

    impl Pipe {
        pub fn new() -> io::Result<Pipe> {
            Err(io::ErrorKind::Unsupported.into())
        }

        pub fn poll_fill(
            &mut self,
            _cx: &mut Context<'_>,
            _src: &TcpStream,
            _left: &mut u64,
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
        }

        pub fn poll_drain(
            &mut self,
            _cx: &mut Context<'_>,
            _dst: &TcpStream,
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
        }

        pub fn held(&self) -> usize {
            0
        }
    }
}

pub use imp::Pipe;
