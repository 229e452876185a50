//! The property mapping between MQTT messages and queue messages (§6.2), both ways. Pure
//! functions: everything here is tested without sockets.

use bytes::Bytes;
use ferry_broker::PublishRequest;
use ferry_core::Outflow;
use ferry_queue::{Message, NewMessage};
use std::collections::BTreeMap;
use std::time::Duration;

pub const SECOND_TOPIC: &str = "mqttSecondTopic";
pub const QOS: &str = "qoslevel";
pub const CLEAN_SESSION: &str = "cleansessionflag";
pub const REAL_TOPIC: &str = "mqttRealTopic";
pub const CLIENT_ID: &str = "clientId";
pub const TOPIC: &str = "topic";
pub const USER_PROPERTY: &str = "mqtt5UserProperty";
pub const EXPIRY: &str = "mqtt5MsgExpireInterval";
pub const CONTENT_TYPE: &str = "mqtt5ContentType";

/// Largest `mqtt5UserProperty` JSON accepted (§6.2).
pub const MAX_USER_PROPERTY_JSON: usize = 8 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct UserProperty {
    key: String,
    value: String,
}

/// A queue message an inflow rule cannot turn into an MQTT message; it will never work, so
/// it is dropped (and logged) rather than redelivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError(pub String);

impl std::fmt::Display for MappingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Inflow: the MQTT publish for queue message `m` under parent topic `parent`.
pub fn inflow_publish(parent: &str, m: &Message) -> Result<PublishRequest, MappingError> {
    let props = &m.properties;
    let second = props.get(SECOND_TOPIC).map(String::as_str).unwrap_or("");
    if !second.is_empty() && !second.starts_with('/') {
        return Err(MappingError(format!(
            "{SECOND_TOPIC} {second:?}: must start with '/'"
        )));
    }
    let topic = format!("{parent}{second}");
    let qos = match props.get(QOS).map(|s| s.trim()) {
        None | Some("") => 1,
        Some("0") => 0,
        Some("1") => 1,
        Some("2") => 2,
        Some(other) => return Err(MappingError(format!("{QOS} {other:?}: must be 0, 1 or 2"))),
    };
    let clean_session = match props.get(CLEAN_SESSION).map(|s| s.trim()) {
        None | Some("") => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            return Err(MappingError(format!(
                "{CLEAN_SESSION} {other:?}: must be true or false"
            )))
        }
    };
    let user_properties = match props.get(USER_PROPERTY) {
        None => Vec::new(),
        Some(json) if json.len() > MAX_USER_PROPERTY_JSON => {
            return Err(MappingError(format!(
                "{USER_PROPERTY}: {} bytes, at most {MAX_USER_PROPERTY_JSON}",
                json.len()
            )))
        }
        Some(json) => serde_json::from_str::<Vec<UserProperty>>(json)
            .map_err(|e| {
                MappingError(format!(
                    "{USER_PROPERTY}: expected [{{\"key\":…,\"value\":…}}, …]: {e}"
                ))
            })?
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect(),
    };
    let message_expiry_interval =
        match props.get(EXPIRY) {
            None => None,
            Some(s) => Some(s.trim().parse::<u32>().map_err(|_| {
                MappingError(format!("{EXPIRY} {s:?}: must be a number of seconds"))
            })?),
        };
    let p2p = second
        .strip_prefix("/p2p/")
        .filter(|id| !id.is_empty() && !id.contains('/'));
    let (topic, p2p_target) = match p2p {
        Some(client_id) => {
            let seen = props
                .get(REAL_TOPIC)
                .filter(|t| !t.is_empty())
                .cloned()
                .unwrap_or(topic);
            (seen, Some(client_id.to_string()))
        }
        None => (topic, None),
    };
    ferry_core::topic::validate_name(&topic)
        .map_err(|e| MappingError(format!("MQTT topic {topic:?}: {e}")))?;
    Ok(PublishRequest {
        topic,
        payload: m.body.clone(),
        qos,
        retain: false,
        user_properties,
        content_type: props.get(CONTENT_TYPE).cloned(),
        message_expiry_interval,
        online_only: p2p_target.is_some() && clean_session,
        p2p_target,
    })
}

/// Outflow: the queue message for a client publish under `parent`, to queue topic `target`.
pub fn outflow_message(parent: &str, target: &str, o: &Outflow, now_ms: u64) -> NewMessage {
    let msg = &o.msg;
    let mut properties = BTreeMap::new();
    let second = msg.topic.strip_prefix(parent).unwrap_or("");
    if !second.is_empty() {
        properties.insert(SECOND_TOPIC.to_string(), second.to_string());
    }
    properties.insert(QOS.to_string(), (msg.qos as u8).to_string());
    properties.insert(CLEAN_SESSION.to_string(), o.clean_start.to_string());
    properties.insert(CLIENT_ID.to_string(), o.client_id.to_string());
    properties.insert(TOPIC.to_string(), msg.topic.to_string());
    if !msg.properties.user_properties.is_empty() {
        let list: Vec<UserProperty> = msg
            .properties
            .user_properties
            .iter()
            .map(|(k, v)| UserProperty {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect();
        properties.insert(
            USER_PROPERTY.to_string(),
            serde_json::to_string(&list).expect("serializes"),
        );
    }
    if let Some(secs) = o.expiry_interval {
        properties.insert(EXPIRY.to_string(), secs.to_string());
    }
    if let Some(ct) = &msg.properties.content_type {
        properties.insert(CONTENT_TYPE.to_string(), ct.to_string());
    }
    NewMessage {
        topic: target.to_string(),
        tag: None,
        keys: Vec::new(),
        properties,
        body: msg.payload.clone(),
        message_id: None,
        born_host: o.client_id.to_string(),
        born_timestamp_ms: now_ms,
    }
}

/// A status event (§5) as the queue message a status rule appends: tag = event type, body =
/// the event's JSON.
pub fn status_message(target: &str, e: &ferry_broker::StatusEvent) -> NewMessage {
    let body = serde_json::json!({
        "clientId": e.client_id,
        "time": e.time_ms,
        "eventType": e.kind.as_str(),
        "channelId": e.channel_id,
        "clientIp": e.client_ip,
    });
    NewMessage {
        topic: target.to_string(),
        tag: Some(e.kind.as_str().to_string()),
        keys: vec![e.client_id.clone()],
        properties: BTreeMap::new(),
        body: Bytes::from(serde_json::to_vec(&body).expect("serializes")),
        message_id: None,
        born_host: e.client_ip.clone(),
        born_timestamp_ms: e.time_ms,
    }
}

/// The Group ID of a cloud client id `<GroupID>@@@<DeviceID>`.
pub fn group_of(client_id: &str) -> Option<&str> {
    client_id.split_once("@@@").map(|(g, _)| g)
}

/// How long an inflow rule's consumer keeps a message invisible while publishing it.
pub const INFLOW_INVISIBLE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_codec::{ByteStr, QoS};
    use std::sync::Arc;

    fn queued(props: &[(&str, &str)]) -> Message {
        Message {
            id: "id".into(),
            topic: "TopicA".into(),
            tag: Some("MQ2MQTT".into()),
            keys: vec![],
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Bytes::from_static(b"hello"),
            born_host: String::new(),
            born_timestamp_ms: 0,
            store_timestamp_ms: 0,
            offset: 0,
        }
    }

    #[test]
    fn inflow_maps_every_property() {
        let p = inflow_publish("TopicB", &queued(&[(SECOND_TOPIC, "/testMq4Iot")])).unwrap();
        assert_eq!(p.topic, "TopicB/testMq4Iot");
        assert_eq!(p.qos, 1, "qoslevel defaults to 1");
        assert_eq!(p.p2p_target, None);
        assert_eq!(&p.payload[..], b"hello");

        let p = inflow_publish(
            "TopicB",
            &queued(&[
                (SECOND_TOPIC, "/p2p/GID_x@@@dev1"),
                (QOS, "2"),
                (CLEAN_SESSION, "false"),
                (REAL_TOPIC, "TopicB/real"),
                (USER_PROPERTY, r#"[{"key":"k","value":"v"}]"#),
                (EXPIRY, "30"),
                (CONTENT_TYPE, "text/plain"),
            ]),
        )
        .unwrap();
        assert_eq!(
            p.topic, "TopicB/real",
            "the P2P receiver sees mqttRealTopic"
        );
        assert_eq!(p.p2p_target.as_deref(), Some("GID_x@@@dev1"));
        assert!(
            !p.online_only,
            "cleansessionflag=false: kept for an offline receiver"
        );
        assert_eq!(p.qos, 2);
        assert_eq!(p.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(p.message_expiry_interval, Some(30));
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));

        let p = inflow_publish("TopicB", &queued(&[(SECOND_TOPIC, "/p2p/dev2")])).unwrap();
        assert_eq!(p.topic, "TopicB/p2p/dev2");
        assert!(p.online_only, "cleansessionflag defaults to true");

        let p = inflow_publish("TopicB", &queued(&[])).unwrap();
        assert_eq!(p.topic, "TopicB");
    }

    #[test]
    fn inflow_refuses_what_can_never_be_published() {
        for props in [
            vec![(SECOND_TOPIC, "no-slash")],
            vec![(QOS, "3")],
            vec![(CLEAN_SESSION, "maybe")],
            vec![(USER_PROPERTY, "{not json")],
            vec![(EXPIRY, "-1")],
            vec![(SECOND_TOPIC, "/a/+/b")],
        ] {
            let err = inflow_publish("TopicB", &queued(&props)).unwrap_err();
            assert!(!err.0.is_empty(), "{props:?}");
        }
        let big = format!("[{}]", vec![r#"{"key":"k","value":"v"}"#; 400].join(","));
        assert!(inflow_publish("TopicB", &queued(&[(USER_PROPERTY, &big)])).is_err());
    }

    #[test]
    fn outflow_carries_the_publish() {
        let msg = ferry_core::Message {
            topic: "TopicA/testMq4Iot".into(),
            payload: Bytes::from_static(b"data"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: ferry_codec::Props {
                user_properties: vec![(ByteStr::from("a"), ByteStr::from("b"))],
                content_type: Some("application/json".into()),
                ..Default::default()
            }
            .into(),
            expires_at: None,
            publisher: "GID_x@@@dev1".into(),
        };
        let o = Outflow {
            client_id: "GID_x@@@dev1".into(),
            clean_start: false,
            msg: Arc::new(msg),
            expiry_interval: Some(60),
        };
        let m = outflow_message("TopicA", "QueueT", &o, 5);
        assert_eq!(m.topic, "QueueT");
        assert_eq!(&m.body[..], b"data");
        let p = |k: &str| m.properties.get(k).map(String::as_str);
        assert_eq!(p(SECOND_TOPIC), Some("/testMq4Iot"));
        assert_eq!(p(QOS), Some("1"));
        assert_eq!(p(CLEAN_SESSION), Some("false"));
        assert_eq!(p(CLIENT_ID), Some("GID_x@@@dev1"));
        assert_eq!(p(TOPIC), Some("TopicA/testMq4Iot"));
        assert_eq!(p(USER_PROPERTY), Some(r#"[{"key":"a","value":"b"}]"#));
        assert_eq!(p(EXPIRY), Some("60"));
        assert_eq!(p(CONTENT_TYPE), Some("application/json"));
    }

    #[test]
    fn status_events_are_tagged_json() {
        let e = ferry_broker::StatusEvent {
            instance: "i".into(),
            client_id: "GID_x@@@dev1".into(),
            channel_id: "2b9b1281046046faafe5e0b458e4abcd".into(),
            kind: ferry_broker::StatusKind::TcpClean,
            time_ms: 1609434061000,
            client_ip: "203.0.113.7:13345".into(),
        };
        let m = status_message("StatusT", &e);
        assert_eq!(m.tag.as_deref(), Some("tcpclean"));
        let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"clientId":"GID_x@@@dev1","time":1609434061000u64,"eventType":"tcpclean","channelId":"2b9b1281046046faafe5e0b458e4abcd","clientIp":"203.0.113.7:13345"})
        );
        assert_eq!(group_of("GID_x@@@dev1"), Some("GID_x"));
        assert_eq!(group_of("plain"), None);
    }
}
