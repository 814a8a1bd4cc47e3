//! `gateway::sigv4::verify` accepts requests signed by real botocore, the library under boto3
//! and the aws CLI, and refuses them once anything signed changes.
//!
//! `fixtures/sigv4_botocore.json` was generated once by a throwaway Python script, not kept:
//! in a virtualenv with `pip install botocore` (1.44.5, recorded in the file's `note`), an
//! `apigateway` client with `endpoint_url="http://127.0.0.1:9180"`, region `us-east-1` and the
//! AWS SigV4 test suite's example key pair (`AKIDEXAMPLE`), its clock
//! (`botocore.auth.get_current_datetime`) patched to 2026-01-15T12:00:00Z, and a
//! `before-send.apigateway` hook that records each request's method, URL, headers and body
//! and answers `200 {}` instead of sending it. `Host` is added as urllib3 sends it
//! (`botocore.auth._host_from_url`), and the machine-specific `User-Agent` is cut to
//! `Botocore/<version>` (botocore never signs it). The last request is signed by
//! `botocore.auth.SigV4Auth` directly on a request that already had a `Date` header, the case
//! where botocore signs `Date` instead of `X-Amz-Date`. To regenerate, repeat those steps.

use std::time::{Duration, SystemTime};

use gateway::sigv4::{self, Credentials, SigV4Error};
use http::request::Parts;
use serde_json::Value;

/// 2026-01-15T12:00:00Z, the fixture's signing time.
const SIGNED_AT: u64 = 1_768_478_400;

struct Signed {
    name: String,
    parts: Parts,
    body: Vec<u8>,
}

fn fixture() -> (Credentials, Vec<Signed>) {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/sigv4_botocore.json"))
        .expect("fixture is JSON");
    assert_eq!(fixture["signing_time"], "20260115T120000Z");
    let text = |v: &Value| v.as_str().expect("fixture strings").to_owned();
    let creds = Credentials::new(
        text(&fixture["access_key_id"]),
        text(&fixture["secret_access_key"]),
    );
    let requests = fixture["requests"]
        .as_array()
        .expect("requests array")
        .iter()
        .map(|request| {
            let url = text(&request["url"]);
            // A server sees the origin form: path and query, the authority in `Host`.
            let origin = url
                .strip_prefix("http://127.0.0.1:9180")
                .expect("fixture URLs use the admin endpoint");
            let mut builder = http::Request::builder()
                .method(text(&request["method"]).as_str())
                .uri(origin);
            for header in request["headers"].as_array().expect("headers array") {
                builder = builder.header(text(&header[0]), text(&header[1]));
            }
            let (parts, ()) = builder.body(()).expect("valid request").into_parts();
            Signed {
                name: text(&request["name"]),
                parts,
                body: text(&request["body"]).into_bytes(),
            }
        })
        .collect();
    (creds, requests)
}

fn at(epoch_secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_secs)
}

#[test]
fn sigv4_accepts_every_botocore_signed_request() {
    let (creds, requests) = fixture();
    assert!(requests.len() >= 9, "the fixture covers the listed cases");
    for Signed { name, parts, body } in &requests {
        sigv4::verify(parts, body, &creds, at(SIGNED_AT))
            .unwrap_or_else(|e| panic!("{name}: {}", e.message()));
        // Within the skew either way, as a real clock would be.
        sigv4::verify(parts, body, &creds, at(SIGNED_AT + 299))
            .unwrap_or_else(|e| panic!("{name}: {}", e.message()));
    }
}

#[test]
fn sigv4_refuses_botocore_signed_requests_once_changed() {
    let (creds, requests) = fixture();
    for Signed { name, parts, body } in &requests {
        let mismatch = |err: SigV4Error| {
            assert!(
                matches!(err, SigV4Error::SignatureMismatch { .. }),
                "{name}: {err}"
            );
            assert_eq!(err.error_type(), "InvalidSignatureException");
        };

        let mut tampered_body = body.clone();
        tampered_body.push(b' ');
        mismatch(sigv4::verify(parts, &tampered_body, &creds, at(SIGNED_AT)).expect_err("body"));

        let mut moved = parts.clone();
        moved.uri = format!("{}x", parts.uri).parse().expect("valid URI");
        mismatch(sigv4::verify(&moved, body, &creds, at(SIGNED_AT)).expect_err("path"));

        let mut rehosted = parts.clone();
        rehosted.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("127.0.0.1:9181"),
        );
        mismatch(sigv4::verify(&rehosted, body, &creds, at(SIGNED_AT)).expect_err("host"));

        let wrong_secret = Credentials::new(creds.access_key_id.clone(), "not-the-secret");
        mismatch(sigv4::verify(parts, body, &wrong_secret, at(SIGNED_AT)).expect_err("secret"));

        let other_key = Credentials::new("AKIDOTHER", creds.secret_access_key.clone());
        let err = sigv4::verify(parts, body, &other_key, at(SIGNED_AT)).expect_err("key");
        assert_eq!(err.error_type(), "UnrecognizedClientException", "{name}");

        let err = sigv4::verify(parts, body, &creds, at(SIGNED_AT + 301)).expect_err("late");
        assert!(
            err.message()
                .starts_with("Signature expired: 20260115T120000Z"),
            "{name}: {err}"
        );
    }
}
