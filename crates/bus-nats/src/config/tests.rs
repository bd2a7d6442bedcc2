//! The configuration's checks, defaults, files and environment overrides.

mod values {
    use super::super::*;

    #[test]
    fn publish_retries_must_fit_the_duplicate_window() {
        let mut config = NatsConfig::new("nats://localhost:4222");
        config.publish_retry_for = DEFAULT_DUPLICATE_WINDOW + Duration::from_secs(1);
        let err = config.validate().unwrap_err();
        assert_eq!(err.field(), "publish_retry_for");
        config.publish_retry_for = DEFAULT_PUBLISH_RETRY_FOR;
        let topic = Topic::new("t").unwrap();
        let mut spec = StreamSpec::new("SHORT", [topic]);
        spec.duplicate_window = Duration::from_secs(10);
        config.streams.push(spec);
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("10s"), "{err}");
        config.publish_retry_for = Duration::from_secs(10);
        config.validate().unwrap();
    }

    #[test]
    fn bad_stream_names_are_refused_by_name() {
        let mut config = NatsConfig::default();
        config.streams.push(StreamSpec::new(
            "orders.v1",
            [Topic::new("orders").unwrap()],
        ));
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), "stream name `orders.v1` is invalid: contains '.'; allowed are ASCII letters, digits, '-' and '_'");
        config.streams[0].name = "ORDERS X".into();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("contains ' '"));
    }

    #[test]
    fn a_topic_in_two_streams_is_refused() {
        let t = Topic::new("t").unwrap();
        let mut config = NatsConfig::default();
        config.streams.push(StreamSpec::new("A", [t.clone()]));
        config.streams.push(StreamSpec::new("B", [t]));
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string().contains("is listed in streams `A` and `B`"),
            "{err}"
        );
    }

    #[test]
    fn credentials_in_urls_are_split_out_and_redacted() {
        assert_eq!(
            split_url_credentials("nats://alice:s%40cret@host:4222"),
            (
                "nats://host:4222".to_owned(),
                Some(UrlCredentials::UserPassword(
                    "alice".into(),
                    "s@cret".into()
                ))
            )
        );
        assert_eq!(
            split_url_credentials("tls://t0ken@host"),
            (
                "tls://host".to_owned(),
                Some(UrlCredentials::Token("t0ken".into()))
            )
        );
        assert_eq!(
            split_url_credentials("nats://host:4222"),
            ("nats://host:4222".to_owned(), None)
        );
        assert_eq!(
            redact_url("nats://alice:pw@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(redact_url("host:4222"), "host:4222");
        let mut config = NatsConfig::new("nats://alice:hunter2@h1,nats://h2");
        config.connection.auth = Auth::Token("tok-secret".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-secret"),
            "{shown}"
        );
    }

    #[test]
    fn names_are_derived_stably() {
        let config = NatsConfig::default().with_group("bus");
        let t = Topic::new("orders.v1").unwrap();
        assert_eq!(default_stream_name(&t), "BUS_ORDERS_V1");
        assert_eq!(config.stream_for(&t).topics, vec![t.clone()]);
        let name = config.consumer_name(&t);
        assert!(name.starts_with("bus-orders_v1-"), "{name}");
        assert_ne!(
            name,
            config.consumer_name(&Topic::new("orders_v1").unwrap())
        );
    }

    #[test]
    fn defaults_are_valid_and_zero_sizes_are_not() {
        NatsConfig::default().validate().unwrap();
        let config = NatsConfig {
            max_in_flight: 0,
            ..NatsConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field(), "max_in_flight");
    }
}

mod files {
    use super::super::*;

    /// The example file documents the defaults: read, it equals the defaults but for the group
    /// and the stream it sets.
    #[test]
    fn the_example_file_is_the_defaults() {
        let read = NatsConfig::from_toml(include_str!("../../bus.example.toml")).unwrap();
        let mut expected = NatsConfig::new("nats://127.0.0.1:4222").with_group("billing");
        expected.streams.push(StreamSpec::new(
            "ACCOUNTS",
            [Topic::new("accounts").unwrap()],
        ));
        assert_eq!(format!("{read:?}"), format!("{expected:?}"));
        assert_eq!(
            format!("{:?}", NatsConfig::from_toml("").unwrap()),
            format!("{:?}", NatsConfig::default())
        );
    }

    #[test]
    fn environment_variables_override_the_file() {
        let env = [
            ("BUS__CONSUMER__GROUP", "payments"),
            (
                "BUS__CONNECTION__SERVERS",
                r#"["nats://a:4222", "nats://b:4222"]"#,
            ),
            ("BUS__RETRY__MAX_ATTEMPTS", "3"),
            ("BUS__RETRY__INITIAL_BACKOFF", "10ms"),
            ("BUS__ON_FAILURE", "halt-aggregate"),
            ("BUS__SUBSCRIPTION_RUNTIME", "own-thread"),
            ("BUS__CONNECTION__AUTH__TOKEN", "s3cret"),
            (
                "BUS__STREAMS",
                r#"[{name = "ACCOUNTS", topics = ["accounts"], replicas = 3}]"#,
            ),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config =
            NatsConfig::from_toml_with_env("[consumer]\ngroup = \"billing\"\n", env).unwrap();
        assert_eq!(config.consumer.group, "payments");
        assert_eq!(
            config.connection.servers,
            ["nats://a:4222", "nats://b:4222"]
        );
        assert_eq!(config.retry.max_attempts, 3);
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(10));
        assert_eq!(config.on_failure, FailurePolicy::HaltAggregate);
        assert_eq!(config.subscription_runtime, SubscriptionRuntime::OwnThread);
        assert!(matches!(&config.connection.auth, Auth::Token(t) if t == "s3cret"));
        assert_eq!(config.streams.len(), 1);
        assert_eq!(config.streams[0].replicas, 3);
        assert_eq!(config.streams[0].topics, [Topic::new("accounts").unwrap()]);
        let err = NatsConfig::from_toml_with_env("", [("BUS__NO_SUCH".to_owned(), "1".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such"), "{err}");
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn mistakes_are_refused_naming_them() {
        let err = NatsConfig::from_toml("[consumer]\ngropu = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gropu"), "{err}");
        let err = NatsConfig::from_toml("[fetch]\nexpires = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expires"), "{err}");
        let err = NatsConfig::from_toml("[[streams]]\nname = \"S\"\ntopics = [\"a b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a b"), "{err}");
        let err = NatsConfig::from_toml(
            "[[streams]]\nname = \"S\"\ntopics = [\"t\"]\nmax_age = \"1h\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_age") && err.contains("limits"), "{err}");
        let ok = NatsConfig::from_toml(
            "[[streams]]\nname = \"S\"\ntopics = [\"t\"]\nretention = \"limits\"\nmax_age = \"1h\"\ndiscard = \"new\"\n",
        )
        .unwrap();
        assert_eq!(ok.streams[0].max_age, Duration::from_secs(3600));
        assert_eq!(ok.streams[0].discard, Some(Discard::New));
        let err = NatsConfig::from_toml_with_env(
            "",
            [("BUS__FETCH__BATCH".to_owned(), "many".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batch"), "{err}");
    }

    #[test]
    fn a_new_group_s_start_is_read_from_files() {
        let start = |toml: &str| {
            NatsConfig::from_toml(&format!("[consumer]\n{toml}\n"))
                .map(|c| c.consumer.start)
                .map_err(|e| e.to_string())
        };
        assert_eq!(start("start = \"start\""), Ok(StartAt::Start));
        assert_eq!(start("start = \"new\""), Ok(StartAt::New));
        assert_eq!(
            start("start = { sequence = 41 }"),
            Ok(StartAt::Sequence(41))
        );
        assert_eq!(
            start("start = { time = \"2026-12-01T00:00:00Z\" }"),
            Ok(StartAt::Time(
                std::time::UNIX_EPOCH + Duration::from_secs(1_796_083_200)
            ))
        );
        let err = start("start = { time = \"yesterday\" }").unwrap_err();
        assert!(err.contains("start"), "{err}");
        let err = start("start = \"end\"").unwrap_err();
        assert!(err.contains("end"), "{err}");
    }
}
