use super::*;

fn event() -> Event {
    crate::event::parse_json(
        br#"{"specversion":"1.0","id":"1","source":"/s","type":"dev.knative.x","subject":"Sub","n":"7","flag":true,"big":4}"#,
    )
    .expect("valid")
}

fn eval(expr: &str) -> (Value<'static>, Option<ErrorKind>) {
    let e = Expression::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    let ev = event();
    let r = e.evaluate(&ev);
    let v = match r.value {
        Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
        Value::Bool(b) => Value::Bool(b),
        Value::Int(i) => Value::Int(i),
    };
    (v, r.error)
}

#[test]
fn precedence_follows_the_reference_grammar() {
    // Logic operators share one level and group to the right.
    assert_eq!(eval("FALSE AND FALSE OR TRUE").0, Value::Bool(false));
    assert_eq!(eval("(FALSE AND FALSE) OR TRUE").0, Value::Bool(true));
    assert_eq!(eval("1 + 2 * 3").0, Value::Int(7));
    assert_eq!(eval("10 - 4 - 3").0, Value::Int(3));
    assert_eq!(eval("1 + 2 = 3").0, Value::Bool(true));
    assert_eq!(eval("5-3").0, Value::Int(2));
    assert_eq!(eval("-7 / 2").0, Value::Int(-3));
    assert_eq!(eval("-7 % 2").0, Value::Int(-1));
}

#[test]
fn attributes_and_extensions_keep_their_types() {
    assert_eq!(eval("flag").0, Value::Bool(true));
    assert_eq!(eval("big + 1").0, Value::Int(5));
    assert_eq!(eval("n * 2").0, Value::Int(14));
    assert_eq!(eval("SUBJECT").0, Value::Str(Cow::Borrowed("Sub")));
    assert_eq!(eval("LOWER(subject) = 'sub'").0, Value::Bool(true));
    assert_eq!(eval("EXISTS nope").0, Value::Bool(false));
    assert_eq!(
        eval("nope = 1"),
        (Value::Bool(false), Some(ErrorKind::MissingAttribute))
    );
}

#[test]
fn filters_pass_only_true_without_errors() {
    let e = event();
    let f = |s: &str| Expression::parse_filter(s).expect("parses").matches(&e);
    assert!(f("type LIKE 'dev.knative.%' AND EXISTS subject"));
    assert!(!f("type LIKE 'dev.knative.%' AND EXISTS time"));
    assert!(
        !f("1 / 0 = 0"),
        "an error fails the filter even when the value is true"
    );
    assert!(!f("'yes'"), "not a boolean");
    assert!(f("source IN ('/a', '/s')"));
    assert!(f("LEFT(type, 12) = 'dev.knative.'"));
}

#[test]
fn parse_errors_say_where_and_what() {
    let e = |s: &str| Expression::parse(s).expect_err(s).to_string();
    assert_eq!(
        e("type ="),
        "CESQL: column 7: expected an expression, found the end of the expression"
    );
    assert_eq!(
        e("(type = 'a'"),
        "CESQL: column 12: expected `)`, found the end of the expression"
    );
    assert_eq!(
        e("type LIKE 3"),
        "CESQL: column 11: expected a string literal pattern after LIKE"
    );
    assert_eq!(e("'abc"), "CESQL: column 1: unterminated string literal");
    assert_eq!(
        e("a b"),
        "CESQL: column 3: expected an operator or the end of the expression, found `b`"
    );
    assert_eq!(
        e("2147483648"),
        "CESQL: column 1: integer literal `2147483648` is out of the 32-bit signed range"
    );
    assert_eq!(
        e("x IN ()"),
        "CESQL: column 7: expected an expression, found `)`"
    );
    assert_eq!(
        e("AND"),
        "CESQL: column 1: expected an expression, found the keyword AND"
    );
    assert_eq!(
        e("my_ext = 1"),
        "CESQL: column 1: `my_ext` is not an attribute name (letters and digits only)"
    );
    assert!(Expression::parse("-2147483648").is_ok());
    assert!(
        Expression::parse_filter("NOPE(1)")
            .expect_err("missing function")
            .contains("no function NOPE with 1 argument(s)")
    );
}

#[test]
fn the_borrowed_text_of_an_event_agrees_with_its_values() {
    let with_time = crate::event::parse_json(
        br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"2020-01-01T00:00:00Z","flag":true,"s":"x"}"#,
    )
    .expect("valid");
    for e in [event(), with_time] {
        for name in [
            "id",
            "source",
            "specversion",
            "type",
            "datacontenttype",
            "dataschema",
            "subject",
            "time",
            "flag",
            "s",
            "n",
            "big",
            "nope",
        ] {
            let attr = Attr::new(name);
            let (text, value) = (e.text(&attr), e.get(&attr));
            match (text, &value) {
                (Text::Missing, None) | (Text::Other, Some(_)) => {}
                (Text::Str(t), Some(Value::Str(v))) => assert_eq!(t, v, "{name}"),
                _ => panic!("{name}: text {text:?}, value {value:?}"),
            }
        }
    }
}

/// Expressions from outside nest as deep as they like; the parser refuses those deeper than
/// `MAX_DEPTH` with an error instead of overflowing the stack. Everything runs on a thread with
/// 2 MiB of stack (a Tokio worker's), in a debug build's larger frames too.
#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let run = || {
        let deep = parse::MAX_DEPTH;
        let refused = [
            format!("{}1 = 1{}", "(".repeat(50_000), ")".repeat(50_000)),
            format!("{}TRUE", "NOT ".repeat(50_000)),
            format!("{}1", "-".repeat(50_000)),
            vec!["TRUE"; 100_000].join(" AND "),
            format!("1{} = 5", " + 1".repeat(100_000)),
            format!("{}1{}", "ABS(".repeat(50_000), ")".repeat(50_000)),
            format!("1 IN ({}1{})", "(".repeat(50_000), ")".repeat(50_000)),
            format!("1{} = 5", " + 1".repeat(deep)),
        ];
        for text in &refused {
            let e = Expression::parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {}...", &text[..40.min(text.len())]));
            assert!(e.to_string().contains("levels deep"), "{e}");
        }
        // As deep as allowed: parsed, compiled, evaluated and dropped.
        let ok = [
            format!("1{} = {}", " + 1".repeat(deep - 2), deep - 1),
            format!("{}TRUE", "NOT ".repeat(deep - 1 - (deep - 1) % 2)),
            vec!["TRUE"; deep / 2].join(" AND "),
            format!("{}1 = 1{}", "(".repeat(deep), ")".repeat(deep)),
        ];
        for text in &ok {
            let e = Expression::parse(text)
                .unwrap_or_else(|err| panic!("{}...: {err}", &text[..40.min(text.len())]));
            assert!(e.matches(&event()), "{}...", &text[..40.min(text.len())]);
        }
    };
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(run)
        .expect("thread")
        .join()
        .expect("no overflow, no failed assertion");
}
