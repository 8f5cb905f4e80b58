use super::*;

#[test]
fn lenient_parse_escapes_raw_newlines() {
    let body = b"{\"model\":\"m\",\"prompt\":\"a\nb\"}";
    let req: CompletionRequest = parse_lenient(body).expect("lenient parse");
    assert_eq!(req.prompt, Prompt::Text("a\nb".into()));
}

#[test]
fn parse_error_reports_original_error() {
    let err = parse_lenient::<CompletionRequest>(b"{not json")
        .err()
        .map(|e| e.message)
        .unwrap_or_default();
    assert!(
        err.starts_with("Failed to deserialize the JSON body into the target type: "),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_collected_and_named() {
    let req: CompletionRequest =
        parse_lenient(br#"{"model":"m","prompt":"x","foo":1,"bar":true,"ignore_eos":true}"#)
            .expect("parses");
    assert_eq!(req.ext.ignore_eos, Some(true));
    let err = rules::unknown_fields(&req.unknown)
        .err()
        .map(|e| e.message)
        .unwrap_or_default();
    assert_eq!(err, "Validation: Unsupported parameter(s): `bar`, `foo`");
}
