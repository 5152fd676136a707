//! Reads every allocated byte of an NBD export and throws it away: the benchmark
//! counterpart of `nbdcopy URI null:` (bench/qemu.sh). Prints the bytes read.
//!
//!     nbdread 'nbd+unix:///EXPORT?socket=PATH' [DEPTH] [REQUEST_BYTES]

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(uri) = args.get(1) else {
        eprintln!("usage: nbdread URI [DEPTH] [REQUEST_BYTES]");
        return ExitCode::from(2);
    };
    match run(uri, args.get(2), args.get(3)) {
        Ok(n) => {
            println!("{n}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbdread: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(uri: &str, depth: Option<&String>, req: Option<&String>) -> Result<u64, String> {
    let (addr, export) = nbd::parse_uri(uri).map_err(|e| e.to_string())?;
    let mut c = nbd::Client::connect(&addr, &export, &[nbd::CONTEXT_BASE_ALLOCATION])
        .map_err(|e| e.to_string())?;
    if let Some(d) = depth {
        c.set_depth(d.parse().map_err(|_| format!("depth {d:?}"))?);
    }
    if let Some(r) = req {
        c.set_max_request(r.parse().map_err(|_| format!("request size {r:?}"))?);
    }
    let size = c.size();
    let extents = c
        .block_status(nbd::CONTEXT_BASE_ALLOCATION, 0, size)
        .map_err(|e| e.to_string())?;
    let chunk = 32u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut total = 0u64;
    for e in extents.iter().filter(|e| e.flags & nbd::STATE_ZERO == 0) {
        let mut off = e.offset;
        while off < e.end() {
            let n = chunk.min(e.end() - off);
            c.read(off, &mut buf[..n as usize])
                .map_err(|e| e.to_string())?;
            off += n;
            total += n;
        }
    }
    c.disconnect().map_err(|e| e.to_string())?;
    Ok(total)
}
