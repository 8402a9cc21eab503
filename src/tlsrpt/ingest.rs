//! Reports delivered by mail (RFC 8460 §5.3.1): the report out of an RFC
//! 5322 message (`multipart/report; report-type=tlsrpt` with an
//! `application/tlsrpt+gzip` or `+json` part), or a bare JSON / gzip
//! report, for `mtasts tlsrpt ingest` behind a Postfix pipe transport,
//! procmail or fetchmail.

/// Content types of the report part of a mailed report.
const REPORT_TYPES: &[&str] = &["application/tlsrpt+gzip", "application/tlsrpt+json"];

/// The report body (gzip or JSON, as sent) in `input`: a mail message or a
/// bare report.
pub fn extract(input: &[u8]) -> Result<Vec<u8>, String> {
    extract_with_kind(input).map(|(body, _)| body)
}

/// [`extract`], and whether `input` was a mail message (whose DKIM
/// signature is then checked).
pub fn extract_with_kind(input: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let start = input
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(input.len());
    let trimmed = &input[start..];
    if trimmed.starts_with(&[0x1f, 0x8b]) || trimmed.starts_with(b"{") {
        return Ok((trimmed.to_vec(), false));
    }
    let mail = mailparse::parse_mail(input)
        .map_err(|e| format!("neither a report nor a mail message ({e})"))?;
    if mail.headers.is_empty() {
        return Err("neither a report (JSON or gzip) nor a mail message".to_owned());
    }
    let mut found = None;
    find_part(&mail, &mut found)?;
    match found {
        Some(body) => Ok((body, true)),
        None => Err(format!(
            "the message ({}) has no application/tlsrpt+gzip or application/tlsrpt+json part",
            mail.ctype.mimetype
        )),
    }
}

fn find_part(part: &mailparse::ParsedMail<'_>, found: &mut Option<Vec<u8>>) -> Result<(), String> {
    if found.is_some() {
        return Ok(());
    }
    let mimetype = part.ctype.mimetype.to_ascii_lowercase();
    let named_report = part
        .ctype
        .params
        .get("name")
        .is_some_and(|n| n.ends_with(".json.gz") || n.ends_with(".json"));
    if REPORT_TYPES.contains(&mimetype.as_str())
        || (named_report
            && matches!(
                mimetype.as_str(),
                "application/gzip" | "application/octet-stream" | "application/json"
            ))
    {
        let body = part
            .get_body_raw()
            .map_err(|e| format!("cannot decode the {mimetype} part ({e})"))?;
        *found = Some(body);
        return Ok(());
    }
    for sub in &part.subparts {
        find_part(sub, found)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_from_a_mail_message() {
        let json = br#"{"organization-name":"X"}"#;
        let b64 = data_encoding::BASE64.encode(json);
        let mail = format!(
            "From: reports@x.example\r\nTo: tlsrpt@y.example\r\nSubject: Report Domain: y.example\r\nTLS-Report-Domain: y.example\r\nTLS-Report-Submitter: x.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nThis is a report.\r\n--B\r\nContent-Type: application/tlsrpt+json\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"x.json\"\r\n\r\n{b64}\r\n--B--\r\n"
        );
        assert_eq!(extract(mail.as_bytes()).expect("extract"), json);
        assert_eq!(extract(b"  {\"a\":1}").expect("bare"), b"{\"a\":1}");
        let err = extract(b"Subject: hi\r\n\r\nhello").expect_err("no report");
        assert!(err.contains("no application/tlsrpt"), "{err}");
    }
}
