//! The actions of the RPC API, with the cloud's parameter and response field names.
//!
//! | Action | Parameters | Answer (besides `RequestId`) |
//! | --- | --- | --- |
//! | `ApplyToken` | `InstanceId`, `Resources` (comma-separated topic filters), `Actions` (`R`, `W`, `R,W`), `ExpireTime` (epoch ms) | `Token` |
//! | `QueryToken` | `InstanceId`, `Token` | `TokenStatus` (true = usable: known, not revoked, not expired) |
//! | `RevokeToken` | `InstanceId`, `Token` | |
//! | `QuerySessionByClientId` | `InstanceId`, `ClientId` | `OnlineStatus` |
//! | `BatchQuerySessionByClientIds` | `InstanceId`, `ClientIdList.N` (1–10) | `OnlineStatusList` `[{ClientId, OnlineStatus}]` |
//! | `SendMessage` | `InstanceId`, `MqttTopic`, `Payload` (UTF-8 text, sent as is, QoS 1) | `MsgId` |
//! | `RegisterDeviceCredential`, `GetDeviceCredential`, `RefreshDeviceCredential` | `InstanceId`, `ClientId` | `DeviceCredential` `{ClientId, DeviceAccessKeyId, DeviceAccessKeySecret, InstanceId, CreateTime, UpdateTime}` |
//! | `UnRegisterDeviceCredential` | `InstanceId`, `ClientId` | |
//! | `ListDeviceCredentialClientId` | `InstanceId`, `GroupId` (optional in Ferry), `PageSize` (1–100, default 100), `PageNo` or `NextToken` | `DeviceCredentialClientIdList` `{ClientIdList, NextToken, PageNo, PageSize, Total}` |
//! | `CreateGroupId`, `DeleteGroupId` | `InstanceId`, `GroupId` | |
//! | `ListGroupId` | `InstanceId` | `Data` `[{GroupId, InstanceId, CreateTime, UpdateTime, IndependentNaming}]` |
//! | `CloseConnection` | `InstanceId`, `ClientId` | `Code` 200, `Success` true, `Message` (404 `ClientNotFound` when not connected) |
//! | `ListInstances` | | `Instances` `[{InstanceId, InstanceName, InstanceStatus (5 = in service), CreateTime, Profile, MqttTags}]`, `Code`, `Success`, `Message` |
//!
//! The trace queries (`QueryMqttTraceDevice`, `QueryMqttTraceMessageOfClient`,
//! `QueryMqttTraceMessagePublish`, `QueryMqttTraceMessageSubscribe`) answer 501
//! `UnsupportedOperation`: Ferry has no trace store yet.

use super::{Params, RpcError};
use crate::AdminState;
use axum::http::StatusCode;
use bytes::Bytes;
use ferry_broker::PublishRequest;
use ferry_meta::{validate, DeviceCredential, TokenActions};
use serde_json::{json, Map, Value};

/// The actions answered, in the order of the product contract.
pub const ACTIONS: &[&str] = &[
    "ApplyToken",
    "QueryToken",
    "RevokeToken",
    "QuerySessionByClientId",
    "BatchQuerySessionByClientIds",
    "SendMessage",
    "RegisterDeviceCredential",
    "GetDeviceCredential",
    "RefreshDeviceCredential",
    "UnRegisterDeviceCredential",
    "ListDeviceCredentialClientId",
    "CreateGroupId",
    "DeleteGroupId",
    "ListGroupId",
    "CloseConnection",
    "ListInstances",
];

/// Trace queries, answered with 501 until Ferry stores traces.
pub const TRACE_ACTIONS: &[&str] = &[
    "QueryMqttTraceDevice",
    "QueryMqttTraceMessageOfClient",
    "QueryMqttTraceMessagePublish",
    "QueryMqttTraceMessageSubscribe",
];

/// Most client ids one `BatchQuerySessionByClientIds` call may ask about.
pub const MAX_BATCH_CLIENT_IDS: usize = 10;

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn credential_json(instance: &str, c: &DeviceCredential) -> Value {
    json!({
        "ClientId": c.client_id,
        "DeviceAccessKeyId": c.device_access_key_id,
        "DeviceAccessKeySecret": c.device_access_key_secret,
        "InstanceId": instance,
        "CreateTime": c.created_at,
        "UpdateTime": c.updated_at,
    })
}

fn number<T: std::str::FromStr>(p: &Params, name: &str) -> Result<Option<T>, RpcError> {
    match p.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| RpcError::invalid(format!("{name} {v:?}: must be a whole number"))),
    }
}

/// Runs `action`; the answer's fields, without `RequestId`.
pub async fn dispatch(
    state: &AdminState,
    action: &str,
    p: &Params,
    now: u64,
) -> Result<Map<String, Value>, RpcError> {
    let meta = &state.meta;
    let control = &state.control;
    if TRACE_ACTIONS.contains(&action) {
        return Err(RpcError::new(
            StatusCode::NOT_IMPLEMENTED,
            "UnsupportedOperation",
            format!("{action}: Ferry does not record message or device traces yet"),
        ));
    }
    if action == "ListInstances" {
        let instances: Vec<Value> = meta
            .instances()
            .into_iter()
            .map(|i| {
                json!({
                    "InstanceId": i.id,
                    "InstanceName": i.name,
                    "InstanceStatus": 5,
                    "CreateTime": i.created_at,
                    "Profile": i.profile,
                    "MqttTags": [],
                })
            })
            .collect();
        return Ok(object(json!({
            "Code": "200",
            "Success": "true",
            "Message": "operation success.",
            "Instances": instances,
        })));
    }
    if !ACTIONS.contains(&action) {
        return Err(RpcError::new(
            StatusCode::NOT_FOUND,
            "InvalidAction.NotFound",
            format!("Specified api {action:?} is not found; see the RPC API's list of actions"),
        ));
    }
    let instance = p.required("InstanceId")?;
    let answer = match action {
        "ApplyToken" => {
            let resources: Vec<String> = p
                .required("Resources")?
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect();
            let actions_param = p.required("Actions")?;
            let actions = TokenActions::parse(actions_param).ok_or_else(|| {
                RpcError::invalid(format!("Actions {actions_param:?}: must be R, W or R,W"))
            })?;
            let expire: u64 = number(p, "ExpireTime")?
                .ok_or_else(|| RpcError::invalid("ExpireTime is required"))?;
            let token = meta.apply_token(instance, resources, actions, expire, now)?;
            json!({ "Token": token.token })
        }
        "QueryToken" => {
            let token = p.required("Token")?;
            let usable = match meta.token(instance, token) {
                Ok(t) => !t.revoked && t.expire_at > now,
                Err(e) if e.code == "TokenNotFound" => false,
                Err(e) => return Err(e.into()),
            };
            json!({ "TokenStatus": usable })
        }
        "RevokeToken" => {
            meta.revoke_token(instance, p.required("Token")?)?;
            json!({})
        }
        "QuerySessionByClientId" => {
            let client = control.client(instance, p.required("ClientId")?).await?;
            json!({ "OnlineStatus": client.is_some_and(|c| c.online) })
        }
        "BatchQuerySessionByClientIds" => {
            let ids = p.list("ClientIdList")?;
            if ids.is_empty() || ids.len() > MAX_BATCH_CLIENT_IDS {
                return Err(RpcError::invalid(format!(
                    "ClientIdList: must hold 1-{MAX_BATCH_CLIENT_IDS} client ids, got {}",
                    ids.len()
                )));
            }
            let mut list = Vec::with_capacity(ids.len());
            for id in ids {
                let client = control.client(instance, id).await?;
                list.push(json!({
                    "ClientId": id,
                    "OnlineStatus": client.is_some_and(|c| c.online),
                }));
            }
            json!({ "OnlineStatusList": list })
        }
        "SendMessage" => {
            let topic = p.required("MqttTopic")?;
            let payload = p
                .get("Payload")
                .ok_or_else(|| RpcError::invalid("Payload is required"))?;
            check_topic(state, instance, topic, payload.len())?;
            let msg_id = control
                .publish(
                    instance,
                    PublishRequest {
                        topic: topic.to_string(),
                        payload: Bytes::copy_from_slice(payload.as_bytes()),
                        qos: 1,
                        ..Default::default()
                    },
                )
                .await?;
            json!({ "MsgId": msg_id })
        }
        "RegisterDeviceCredential" => {
            let c = meta.register_credential(instance, p.required("ClientId")?, now)?;
            json!({ "DeviceCredential": credential_json(instance, &c) })
        }
        "GetDeviceCredential" => {
            let c = meta.credential(instance, p.required("ClientId")?)?;
            json!({ "DeviceCredential": credential_json(instance, &c) })
        }
        "RefreshDeviceCredential" => {
            let c = meta.refresh_credential(instance, p.required("ClientId")?, now)?;
            json!({ "DeviceCredential": credential_json(instance, &c) })
        }
        "UnRegisterDeviceCredential" => {
            meta.unregister_credential(instance, p.required("ClientId")?)?;
            json!({})
        }
        "ListDeviceCredentialClientId" => list_credentials(state, instance, p)?,
        "CreateGroupId" => {
            meta.create_group(instance, p.required("GroupId")?, now)?;
            json!({})
        }
        "DeleteGroupId" => {
            meta.delete_group(instance, p.required("GroupId")?)?;
            json!({})
        }
        "ListGroupId" => {
            let data: Vec<Value> = meta
                .groups(instance)?
                .into_iter()
                .map(|g| {
                    json!({
                        "GroupId": g.group_id,
                        "InstanceId": instance,
                        "CreateTime": g.created_at,
                        "UpdateTime": g.created_at,
                        "IndependentNaming": true,
                    })
                })
                .collect();
            json!({ "Data": data })
        }
        "CloseConnection" => {
            let client_id = p.required("ClientId")?;
            if !control.kick(instance, client_id).await? {
                return Err(RpcError::new(
                    StatusCode::NOT_FOUND,
                    "ClientNotFound",
                    format!("client {client_id:?} is not connected"),
                ));
            }
            json!({ "Code": 200, "Success": true, "Message": "operation success." })
        }
        other => {
            return Err(RpcError::new(
                StatusCode::NOT_FOUND,
                "InvalidAction.NotFound",
                format!("Specified api {other:?} is not found"),
            ))
        }
    };
    Ok(object(answer))
}

/// The instance's topic rules for a message sent through the API, as for a client's PUBLISH:
/// in a `cloud` instance the first level must be a created parent topic and the topic must
/// follow the naming rules; the payload must fit the instance's maximum.
fn check_topic(
    state: &AdminState,
    instance: &str,
    topic: &str,
    payload_len: usize,
) -> Result<(), RpcError> {
    let settings = state.meta.instance(instance)?.settings;
    if settings.max_payload_size != 0 && payload_len > settings.max_payload_size as usize {
        return Err(RpcError::invalid(format!(
            "Payload: {payload_len} bytes, above the instance's maximum of {}",
            settings.max_payload_size
        )));
    }
    if !settings.require_parent_topic {
        return Ok(());
    }
    let parent = topic.split('/').next().unwrap_or_default();
    if !state.meta.has_topic(instance, parent) {
        return Err(RpcError::new(
            StatusCode::NOT_FOUND,
            "TopicNotFound",
            format!("MqttTopic {topic:?}: parent topic {parent:?} does not exist"),
        ));
    }
    let (min, max) = (
        settings.topic_min_len as usize,
        settings.topic_max_len as usize,
    );
    if ferry_core::broker::p2p_target(topic).is_some() && settings.p2p {
        // `<parent>/p2p/<ClientId>`: the client id has its own rules (`@@@`).
        if topic.len() < min || topic.len() > max {
            return Err(RpcError::invalid(format!(
                "MqttTopic {topic:?}: must be {min}-{max} characters"
            )));
        }
        return Ok(());
    }
    validate::cloud_topic(topic, min, max, false)?;
    Ok(())
}

fn list_credentials(state: &AdminState, instance: &str, p: &Params) -> Result<Value, RpcError> {
    let page_size: usize = number(p, "PageSize")?.unwrap_or(100);
    if !(1..=100).contains(&page_size) {
        return Err(RpcError::invalid(format!(
            "PageSize {page_size}: must be 1-100"
        )));
    }
    let page_no: usize = number(p, "PageNo")?.unwrap_or(1);
    if page_no == 0 {
        return Err(RpcError::invalid("PageNo: pages are counted from 1"));
    }
    let prefix = p
        .get("GroupId")
        .filter(|g| !g.is_empty())
        .map(|g| format!("{g}@@@"));
    // Sorted by client id.
    let ids: Vec<String> = state
        .meta
        .credential_client_ids(instance)?
        .into_iter()
        .filter(|id| {
            prefix
                .as_ref()
                .is_none_or(|pre| id.starts_with(pre.as_str()))
        })
        .collect();
    let total = ids.len();
    // NextToken is the last client id of the previous page.
    let start = match p.get("NextToken").filter(|t| !t.is_empty()) {
        Some(after) => ids.partition_point(|id| id.as_str() <= after),
        None => (page_no - 1).saturating_mul(page_size).min(total),
    };
    let end = start.saturating_add(page_size).min(total);
    let page = &ids[start..end];
    let mut list = json!({
        "ClientIdList": page,
        "PageNo": page_no.to_string(),
        "PageSize": page_size.to_string(),
        "Total": total.to_string(),
    });
    if end < total {
        if let (Some(last), Some(m)) = (page.last(), list.as_object_mut()) {
            m.insert("NextToken".into(), Value::String(last.clone()));
        }
    }
    Ok(json!({ "DeviceCredentialClientIdList": list }))
}
