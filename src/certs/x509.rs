//! The one thing drover reads from a certificate: its validity. A short DER walk of the
//! leaf's `TBSCertificate` (RFC 5280 4.1) to `validity`, rather than an X.509 library in
//! the binary of a small board; anything unexpected is `None`, never a panic.

use base64::Engine as _;

/// `(not_before, not_after)` in unix seconds of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<(i64, i64)> {
    let der = first_der(pem)?;
    let (cert, _) = element(&der, 0x30)?;
    let (tbs, _) = element(cert, 0x30)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = element(rest, 0xa0)?.1;
    }
    rest = element(rest, 0x02)?.1; // serialNumber
    rest = element(rest, 0x30)?.1; // signature algorithm
    rest = element(rest, 0x30)?.1; // issuer
    let (validity, _) = element(rest, 0x30)?;
    let (before, rest) = time(validity)?;
    let (after, _) = time(rest)?;
    Some((before, after))
}

fn first_der(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// The content of the DER element at the start of `data` if its tag is `tag`, and what
/// follows it.
fn element(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = data.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime or GeneralizedTime at the start of `data`, as unix seconds, and what follows.
fn time(data: &[u8]) -> Option<(i64, &[u8])> {
    let (tag, digits) = match data.first()? {
        0x17 => (0x17, 12),
        0x18 => (0x18, 14),
        _ => return None,
    };
    let (text, rest) = element(data, tag)?;
    let text = std::str::from_utf8(text).ok()?;
    let text = text.strip_suffix('Z')?;
    if text.len() != digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<i64>().ok();
    let (year, at) = if digits == 12 {
        let yy = num(0..2)?;
        // RFC 5280 4.1.2.5.1: 50-99 are 19xx.
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
    } else {
        (num(0..4)?, 4)
    };
    let month = num(at..at + 2)?;
    let day = num(at + 2..at + 4)?;
    let (h, m, s) = (
        num(at + 4..at + 6)?,
        num(at + 6..at + 8)?,
        num(at + 8..at + 10)?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some((
        days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s,
        rest,
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -days 90`: notBefore Dec 7 19:03:02 2026, notAfter Mar 7
    /// 19:03:02 2027 (`date -d ... +%s`: 1796670182 and 1804446182).
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBeDCCAR2gAwIBAgIUWZ8JnMUnBeo4wwrrDmbu8P/YxKEwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGYS50ZXN0MB4XDTI2MTIwNzE5MDMwMloXDTI3MDMwNzE5MDMw
MlowETEPMA0GA1UEAwwGYS50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
thLWlfV08UYRxXMZA8IdWGQxhpi4w/MoeR0Tv7PHVuyfOBaqjXYA5rmMn0LAnIEA
wCiq6PJl7fKEdqzBDrDAX6NTMFEwHQYDVR0OBBYEFGhQMo8kSyhds7k7FlHz13NN
P4L/MB8GA1UdIwQYMBaAFGhQMo8kSyhds7k7FlHz13NNP4L/MA8GA1UdEwEB/wQF
MAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhALXR4sghfDbLqMec8gpkFrU/xROgt+8A
oeE2oFzqbFL/AiEA3geLibIKE2avSdCez2kySlHVBxDXa6DN1U06SGGFyYc=
-----END CERTIFICATE-----
";

    #[test]
    fn the_validity_of_a_real_certificate_is_read() {
        assert_eq!(validity(CERT), Some((1_796_670_182, 1_804_446_182)));
        // A chain: the leaf's.
        let chain = format!("{CERT}{CERT}");
        assert_eq!(validity(&chain), Some((1_796_670_182, 1_804_446_182)));
    }

    #[test]
    fn anything_else_is_none() {
        assert_eq!(validity(""), None);
        assert_eq!(
            validity("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"),
            None
        );
        // Cut short inside the TBSCertificate.
        let der = first_der(CERT).expect("der");
        let pem = |d: &[u8]| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----",
                base64::engine::general_purpose::STANDARD.encode(d)
            )
        };
        for n in [4, 40, 120] {
            assert_eq!(validity(&pem(&der[..n])), None, "{n} bytes");
        }
    }

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 7) * 86_400, 1_796_601_600);
    }
}
