//! A tar archive of a few small files, built in memory: how a deploy's request and
//! credentials reach its container (`PUT /containers/{id}/archive`) without a bind mount,
//! argv or the container's environment (which `docker inspect` shows).

/// One file: its path inside the container (relative to `/`), mode and content.
pub struct File {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// A ustar archive of `dirs` (mode 0700) and `files`, owned by root.
pub fn tar(dirs: &[&str], files: &[File]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in dirs {
        header(
            &mut out,
            &format!("{}/", d.trim_end_matches('/')),
            0o700,
            0,
            b'5',
        );
    }
    for f in files {
        header(&mut out, &f.path, f.mode, f.data.len(), b'0');
        out.extend_from_slice(&f.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn header(out: &mut Vec<u8>, path: &str, mode: u32, size: usize, kind: u8) {
    let mut h = [0u8; 512];
    let name = path.as_bytes();
    // Paths here are short and fixed (see `deployer`): the 100-byte name field holds them.
    let n = name.len().min(99);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size as u64);
    octal(&mut h[136..148], crate::clock::unix_millis() / 1000);
    h[148..156].fill(b' ');
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    out.extend_from_slice(&h);
}

/// `field.len() - 1` octal digits and a NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(digits);
    field[..digits].copy_from_slice(&bytes[start..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_lists_its_files_for_tar_itself() {
        let bytes = tar(
            &["run/x"],
            &[File {
                path: "run/x/token".into(),
                mode: 0o600,
                data: b"abc".to_vec(),
            }],
        );
        assert_eq!(bytes.len() % 512, 0);
        let dir = tempfile::tempdir().expect("dir");
        let archive = dir.path().join("a.tar");
        std::fs::write(&archive, &bytes).expect("write");
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&archive)
            .output()
            .expect("tar");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}");
        assert!(
            listing.contains("-rw------- ") && listing.contains("run/x/token"),
            "{listing}"
        );
    }
}
