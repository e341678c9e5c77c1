//! Errors as one line of text, for logs and for the command line.

/// An error with all its causes, joined by ": " ("error sending request: … :
/// invalid peer certificate: UnknownIssuer"). A cause whose text is already
/// in the line (an error that prints its source too) is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::chain;
    use std::fmt;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<Wrap>>);

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn every_cause_once() {
        let e = Wrap("sending: refused", Some(Box::new(Wrap("connect", Some(Box::new(Wrap("refused", None)))))));
        assert_eq!(chain(&e), "sending: refused: connect");
        assert_eq!(chain(&Wrap("alone", None)), "alone");
    }
}
