"""The cloud's official Python SDK (aliyun-python-sdk-core + aliyun-python-sdk-onsmqtt, API version
2020-04-20) against Ferry's cloud-compatible RPC API.

This module starts its own ``ferry serve`` (``$FERRY_BIN``, default target/debug/ferry) with a
config file that adds a ``cloud``-profile instance, reads the MQTT address, the API address and
the admin key from the lines Ferry prints on stdout, and points an ``AcsClient`` at the API over
plain HTTP. Actions that have a request class in the onsmqtt package are called with it; the
others (ListDeviceCredentialClientId, CloseConnection, ListInstances and the trace queries) with
the core SDK's ``CommonRequest``, as the SDK documents for actions without a class.

MQTT clients are paho-mqtt. Every wait is bounded; the process is stopped by its PID.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import CommonRequest
from aliyunsdkonsmqtt.request.v20200420 import (
    ApplyTokenRequest,
    BatchQuerySessionByClientIdsRequest,
    CreateGroupIdRequest,
    DeleteGroupIdRequest,
    GetDeviceCredentialRequest,
    ListGroupIdRequest,
    QuerySessionByClientIdRequest,
    QueryTokenRequest,
    RefreshDeviceCredentialRequest,
    RegisterDeviceCredentialRequest,
    RevokeTokenRequest,
    SendMessageRequest,
    UnRegisterDeviceCredentialRequest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0
CLOUD = "mqtt-cloud"
DEFAULT = "default"
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")


def _ferry_binary() -> Path:
    if os.environ.get("FERRY_BIN"):
        return Path(os.environ["FERRY_BIN"])
    if os.environ.get("CARGO_TARGET_DIR"):
        return Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "ferry"
    return REPO_ROOT / "target" / "debug" / "ferry"


class Ferry:
    """A ``ferry serve`` process of this module, and what it announced on stdout."""

    def __init__(self, workdir: Path) -> None:
        binary = _ferry_binary()
        if not binary.is_file():
            pytest.fail(f"Ferry binary not found at {binary}; build it (cargo build -p ferry) "
                        "or set FERRY_BIN", pytrace=False)
        config = workdir / "ferry.toml"
        config.write_text(f'[[instances]]\nid = "{CLOUD}"\nname = "Cloud"\nprofile = "cloud"\n')
        self.log_path = workdir / "ferry.stderr.log"
        cmd = [str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0",
               "--api-listen", "127.0.0.1:0", "--queue-listen", "127.0.0.1:0",
               "--data-dir", str(workdir / "data"),
               "--log-level", "warn"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name="ferry-sdk-stdout", daemon=True).start()
        self.mqtt_host, self.mqtt_port = self._split(self._expect(r"mqtt listening on (\S+)")[0])
        self.api = self._expect(r"api listening on http://(\S+)")[0]
        self.key_id, self.key_secret = self._expect(r"admin key created .*: id (\S+) secret (\S+)")

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _expect(self, pattern: str) -> tuple[str, ...]:
        deadline = time.monotonic() + 20.0
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                pytest.fail(f"ferry serve did not print {pattern!r}:\n{self.log_tail()}",
                            pytrace=False)
            match = re.search(pattern, line)
            if match:
                return match.groups()

    @staticmethod
    def _split(addr: str) -> tuple[str, int]:
        host, _, port = addr.rpartition(":")
        return host.strip("[]"), int(port)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def ferry(tmp_path_factory):
    server = Ferry(tmp_path_factory.mktemp("ferry-sdk"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sdk(ferry):
    """Calls through an AcsClient pointed at Ferry (plain HTTP, no retries)."""
    if ferry.proc.poll() is not None:
        pytest.fail(f"ferry exited with {ferry.proc.returncode}\n{ferry.log_tail()}", pytrace=False)
    client = AcsClient(ferry.key_id, ferry.key_secret, "cn-hangzhou", auto_retry=False,
                       timeout=WAIT, connect_timeout=5)
    yield Sdk(client, ferry.api)
    assert ferry.proc.poll() is None, f"ferry exited during the test\n{ferry.log_tail()}"


class Sdk:
    def __init__(self, client: AcsClient, endpoint: str) -> None:
        self.client = client
        self.endpoint = endpoint

    def _prepare(self, request):
        request.set_endpoint(self.endpoint)
        request.set_protocol_type("http")
        return request

    def call(self, request) -> dict:
        body = json.loads(self.client.do_action_with_exception(self._prepare(request)))
        assert REQUEST_ID.match(body.get("RequestId", "")), body
        return body

    def fails(self, request) -> ServerException:
        with pytest.raises(ServerException) as info:
            self.client.do_action_with_exception(self._prepare(request))
        assert REQUEST_ID.match(info.value.request_id or ""), info.value
        return info.value

    @staticmethod
    def common(action: str, **params) -> CommonRequest:
        request = CommonRequest(version="2020-04-20", action_name=action, product="OnsMqtt")
        request.set_method("POST")
        for name, value in params.items():
            request.add_query_param(name, value)
        return request


def make(cls, **params):
    request = cls()
    for name, value in params.items():
        getattr(request, f"set_{name}")(value)
    return request


class Device:
    """A paho-mqtt 3.1.1 client whose network loop runs in a background thread."""

    def __init__(self, ferry: Ferry, client_id: str, username: str | None = None,
                 password: str | None = None) -> None:
        self.client_id = client_id
        self.messages: queue.Queue = queue.Queue()
        self.connack = threading.Event()
        self.disconnected = threading.Event()
        self.subacked = threading.Event()
        self.reason = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.client.on_subscribe = lambda *args: self.subacked.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(ferry.mqtt_host, ferry.mqtt_port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(WAIT), f"{client_id}: no CONNACK"
        assert not self.reason.is_failure, f"{client_id}: CONNACK {self.reason}"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        self.connack.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)
        assert self.subacked.wait(WAIT), f"{self.client_id}: no SUBACK"

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def devices():
    made: list[Device] = []

    def connect(*args, **kwargs) -> Device:
        device = Device(*args, **kwargs)
        made.append(device)
        return device

    yield connect
    for device in made:
        device.close()


def group_id() -> str:
    return f"GID_sdk{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------------------------


def test_create_list_delete_group_and_errors(sdk):
    gid = group_id()
    sdk.call(make(CreateGroupIdRequest.CreateGroupIdRequest, InstanceId=CLOUD, GroupId=gid))
    groups = sdk.call(make(ListGroupIdRequest.ListGroupIdRequest, InstanceId=CLOUD))["Data"]
    mine = [g for g in groups if g["GroupId"] == gid]
    assert len(mine) == 1, groups
    assert mine[0]["InstanceId"] == CLOUD
    assert mine[0]["IndependentNaming"] is True
    assert isinstance(mine[0]["CreateTime"], int) and isinstance(mine[0]["UpdateTime"], int)

    dup = sdk.fails(make(CreateGroupIdRequest.CreateGroupIdRequest, InstanceId=CLOUD,
                         GroupId=gid))
    assert (dup.http_status, dup.error_code) == (400, "GroupIdAlreadyExsited")

    bad = sdk.fails(make(CreateGroupIdRequest.CreateGroupIdRequest, InstanceId=CLOUD,
                         GroupId="nogid"))
    assert (bad.http_status, bad.error_code) == (400, "ParameterCheckFailed")
    assert "GroupId" in bad.message

    missing = sdk.fails(make(ListGroupIdRequest.ListGroupIdRequest, InstanceId="mqtt-nope"))
    assert (missing.http_status, missing.error_code) == (404, "InstanceNotFound")

    sdk.call(make(DeleteGroupIdRequest.DeleteGroupIdRequest, InstanceId=CLOUD, GroupId=gid))
    groups = sdk.call(make(ListGroupIdRequest.ListGroupIdRequest, InstanceId=CLOUD))["Data"]
    assert gid not in [g["GroupId"] for g in groups]
    gone = sdk.fails(make(DeleteGroupIdRequest.DeleteGroupIdRequest, InstanceId=CLOUD,
                          GroupId=gid))
    assert (gone.http_status, gone.error_code) == (404, "GroupIdNotFound")


def test_device_credentials_lifecycle(sdk, ferry, devices):
    gid = group_id()
    sdk.call(make(CreateGroupIdRequest.CreateGroupIdRequest, InstanceId=CLOUD, GroupId=gid))
    client_id = f"{gid}@@@device1"

    reg = sdk.call(make(RegisterDeviceCredentialRequest.RegisterDeviceCredentialRequest,
                        InstanceId=CLOUD, ClientId=client_id))["DeviceCredential"]
    assert set(reg) == {"ClientId", "DeviceAccessKeyId", "DeviceAccessKeySecret", "InstanceId",
                        "CreateTime", "UpdateTime"}, reg
    assert reg["ClientId"] == client_id and reg["InstanceId"] == CLOUD

    got = sdk.call(make(GetDeviceCredentialRequest.GetDeviceCredentialRequest,
                        InstanceId=CLOUD, ClientId=client_id))["DeviceCredential"]
    assert got == reg

    # The credential logs a device in (DeviceCredential mode).
    username = f"DeviceCredential|{reg['DeviceAccessKeyId']}|{CLOUD}"
    password = base64.b64encode(hmac.new(reg["DeviceAccessKeySecret"].encode(),
                                         client_id.encode(), hashlib.sha1).digest()).decode()
    devices(ferry, client_id, username, password)

    for n in (2, 3):
        sdk.call(make(RegisterDeviceCredentialRequest.RegisterDeviceCredentialRequest,
                      InstanceId=CLOUD, ClientId=f"{gid}@@@device{n}"))
    listed = sdk.call(sdk.common("ListDeviceCredentialClientId", InstanceId=CLOUD, GroupId=gid,
                                 PageSize="2"))["DeviceCredentialClientIdList"]
    assert listed["ClientIdList"] == [client_id, f"{gid}@@@device2"], listed
    assert listed["Total"] == "3"
    rest = sdk.call(sdk.common("ListDeviceCredentialClientId", InstanceId=CLOUD, GroupId=gid,
                               PageSize="2", NextToken=listed["NextToken"]))
    assert rest["DeviceCredentialClientIdList"]["ClientIdList"] == [f"{gid}@@@device3"]

    refreshed = sdk.call(make(RefreshDeviceCredentialRequest.RefreshDeviceCredentialRequest,
                              InstanceId=CLOUD, ClientId=client_id))["DeviceCredential"]
    assert refreshed["DeviceAccessKeySecret"] != reg["DeviceAccessKeySecret"]
    assert refreshed["DeviceAccessKeyId"] == reg["DeviceAccessKeyId"]
    got = sdk.call(make(GetDeviceCredentialRequest.GetDeviceCredentialRequest,
                        InstanceId=CLOUD, ClientId=client_id))["DeviceCredential"]
    assert got["DeviceAccessKeySecret"] == refreshed["DeviceAccessKeySecret"]

    sdk.call(make(UnRegisterDeviceCredentialRequest.UnRegisterDeviceCredentialRequest,
                  InstanceId=CLOUD, ClientId=client_id))
    gone = sdk.fails(make(GetDeviceCredentialRequest.GetDeviceCredentialRequest,
                          InstanceId=CLOUD, ClientId=client_id))
    assert (gone.http_status, gone.error_code) == (404, "DeviceCredentialNotFound")
    listed = sdk.call(sdk.common("ListDeviceCredentialClientId", InstanceId=CLOUD, GroupId=gid,
                                 PageSize="10"))["DeviceCredentialClientIdList"]
    assert client_id not in listed["ClientIdList"]


def test_apply_query_revoke_token(sdk):
    expire = int(time.time() * 1000) + 3600 * 1000
    token = sdk.call(make(ApplyTokenRequest.ApplyTokenRequest, InstanceId=CLOUD,
                          Resources="TopicA/#,TopicB/+", Actions="R,W",
                          ExpireTime=expire))["Token"]
    assert token
    status = sdk.call(make(QueryTokenRequest.QueryTokenRequest, InstanceId=CLOUD, Token=token))
    assert status["TokenStatus"] is True
    sdk.call(make(RevokeTokenRequest.RevokeTokenRequest, InstanceId=CLOUD, Token=token))
    status = sdk.call(make(QueryTokenRequest.QueryTokenRequest, InstanceId=CLOUD, Token=token))
    assert status["TokenStatus"] is False
    forged = sdk.call(make(QueryTokenRequest.QueryTokenRequest, InstanceId=CLOUD,
                           Token="not-a-token"))
    assert forged["TokenStatus"] is False

    too_soon = sdk.fails(make(ApplyTokenRequest.ApplyTokenRequest, InstanceId=CLOUD,
                              Resources="TopicA/#", Actions="R",
                              ExpireTime=int(time.time() * 1000) + 1000))
    assert (too_soon.http_status, too_soon.error_code) == (400, "ParameterCheckFailed")


def test_send_message_reaches_a_subscriber(sdk, ferry, devices):
    topic = f"sdk/{uuid.uuid4().hex}/news"
    subscriber = devices(ferry, f"sdk-sub-{uuid.uuid4().hex[:8]}")
    subscriber.subscribe(topic.rsplit("/", 1)[0] + "/#")
    payload = "hello from the SDK: ünïcode & symbols=+*"
    sent = sdk.call(make(SendMessageRequest.SendMessageRequest, InstanceId=DEFAULT,
                         MqttTopic=topic, Payload=payload))
    assert sent["MsgId"]
    got_topic, got_payload = subscriber.messages.get(timeout=WAIT)
    assert got_topic == topic
    assert got_payload == payload.encode()

    missing = sdk.fails(make(SendMessageRequest.SendMessageRequest, InstanceId="mqtt-nope",
                             MqttTopic=topic, Payload="x"))
    assert (missing.http_status, missing.error_code) == (404, "InstanceNotFound")
    # A cloud instance needs the parent topic first.
    no_parent = sdk.fails(make(SendMessageRequest.SendMessageRequest, InstanceId=CLOUD,
                               MqttTopic="NoSuchParent/x", Payload="x"))
    assert (no_parent.http_status, no_parent.error_code) == (404, "TopicNotFound")


def test_sessions_batch_query_and_close_connection(sdk, ferry, devices):
    client_id = f"sdk-sess-{uuid.uuid4().hex[:8]}"
    device = devices(ferry, client_id)

    online = sdk.call(make(QuerySessionByClientIdRequest.QuerySessionByClientIdRequest,
                           InstanceId=DEFAULT, ClientId=client_id))
    assert online["OnlineStatus"] is True
    batch = sdk.call(make(BatchQuerySessionByClientIdsRequest.BatchQuerySessionByClientIdsRequest,
                          InstanceId=DEFAULT, ClientIdLists=[client_id, "sdk-nobody"]))
    assert batch["OnlineStatusList"] == [
        {"ClientId": client_id, "OnlineStatus": True},
        {"ClientId": "sdk-nobody", "OnlineStatus": False},
    ]
    too_many = sdk.fails(make(
        BatchQuerySessionByClientIdsRequest.BatchQuerySessionByClientIdsRequest,
        InstanceId=DEFAULT, ClientIdLists=[f"c{i}" for i in range(11)]))
    assert (too_many.http_status, too_many.error_code) == (400, "ParameterCheckFailed")

    closed = sdk.call(sdk.common("CloseConnection", InstanceId=DEFAULT, ClientId=client_id))
    assert closed["Success"] is True and closed["Code"] == 200
    assert device.disconnected.wait(WAIT), "the client was not disconnected"

    offline = sdk.call(make(QuerySessionByClientIdRequest.QuerySessionByClientIdRequest,
                            InstanceId=DEFAULT, ClientId=client_id))
    assert offline["OnlineStatus"] is False
    again = sdk.fails(sdk.common("CloseConnection", InstanceId=DEFAULT, ClientId=client_id))
    assert (again.http_status, again.error_code) == (404, "ClientNotFound")


def test_list_instances(sdk):
    body = sdk.call(sdk.common("ListInstances"))
    assert body["Success"] == "true"
    by_id = {i["InstanceId"]: i for i in body["Instances"]}
    assert {DEFAULT, CLOUD} <= set(by_id), body
    assert by_id[CLOUD]["InstanceName"] == "Cloud"
    assert by_id[CLOUD]["InstanceStatus"] == 5


@pytest.mark.parametrize("action", [
    "QueryMqttTraceDevice",
    "QueryMqttTraceMessageOfClient",
    "QueryMqttTraceMessagePublish",
    "QueryMqttTraceMessageSubscribe",
])
def test_trace_queries_are_not_supported_yet(sdk, action):
    err = sdk.fails(sdk.common(action, InstanceId=CLOUD, ClientId="GID_x@@@y",
                               BeginTime="0", EndTime=str(int(time.time() * 1000))))
    assert (err.http_status, err.error_code) == (501, "UnsupportedOperation")
    assert "trace" in err.message


def test_wrong_secret_and_unknown_key(ferry):
    request = make(ListGroupIdRequest.ListGroupIdRequest, InstanceId=CLOUD)
    wrong = Sdk(AcsClient(ferry.key_id, "not-the-secret", "cn-hangzhou", auto_retry=False,
                          timeout=WAIT, connect_timeout=5), ferry.api)
    err = wrong.fails(request)
    # Ferry answers SignatureDoesNotMatch with the cloud's message; the SDK recognises its own
    # string to sign in it and reports a wrong secret.
    assert err.http_status == 400
    assert err.error_code in ("InvalidAccessKeySecret", "SignatureDoesNotMatch")

    unknown = Sdk(AcsClient("FERRYNOSUCHKEY", ferry.key_secret, "cn-hangzhou", auto_retry=False,
                            timeout=WAIT, connect_timeout=5), ferry.api)
    err = unknown.fails(make(ListGroupIdRequest.ListGroupIdRequest, InstanceId=CLOUD))
    assert (err.http_status, err.error_code) == (404, "InvalidAccessKeyId.NotFound")


# ------------------------------------------------------------------------------------------------
# The newer generated SDK (alibabacloud-onsmqtt20200420), which signs with ACS3-HMAC-SHA256 by
# default and with HMAC-SHA1 (version 1.0) when configured with signature_algorithm="v2".


@pytest.fixture(params=["v3", "v2"], ids=["acs3-hmac-sha256", "hmac-sha1"])
def tea(request, ferry):
    tea_client = pytest.importorskip("alibabacloud_onsmqtt20200420.client")
    openapi = pytest.importorskip("alibabacloud_tea_openapi.models")
    config = openapi.Config(access_key_id=ferry.key_id, access_key_secret=ferry.key_secret,
                            endpoint=ferry.api, protocol="http", region_id="cn-hangzhou",
                            read_timeout=int(WAIT * 1000), connect_timeout=5000)
    if request.param == "v2":
        config.signature_algorithm = "v2"
    return tea_client.Client(config)


def test_newer_sdk(tea, ferry, devices):
    from alibabacloud_onsmqtt20200420 import models

    gid = group_id()
    response = tea.create_group_id(models.CreateGroupIdRequest(instance_id=CLOUD, group_id=gid))
    assert response.status_code == 200
    assert REQUEST_ID.match(response.body.request_id)
    groups = tea.list_group_id(models.ListGroupIdRequest(instance_id=CLOUD)).body.data
    assert gid in [g.group_id for g in groups]
    with pytest.raises(Exception) as info:
        tea.create_group_id(models.CreateGroupIdRequest(instance_id=CLOUD, group_id=gid))
    assert getattr(info.value, "code", None) == "GroupIdAlreadyExsited", info.value
    assert info.value.data["statusCode"] == 400

    cred = tea.register_device_credential(models.RegisterDeviceCredentialRequest(
        instance_id=CLOUD, client_id=f"{gid}@@@dev")).body.device_credential
    assert cred.client_id == f"{gid}@@@dev" and cred.device_access_key_secret
    listed = tea.list_device_credential_client_id(models.ListDeviceCredentialClientIdRequest(
        instance_id=CLOUD, group_id=gid, page_size="10")).body.device_credential_client_id_list
    assert listed.client_id_list == [f"{gid}@@@dev"] and listed.total == "1"

    token = tea.apply_token(models.ApplyTokenRequest(
        instance_id=CLOUD, resources="TopicA/#", actions="R",
        expire_time=int(time.time() * 1000) + 600_000)).body.token
    assert tea.query_token(models.QueryTokenRequest(instance_id=CLOUD, token=token)) \
        .body.token_status is True

    client_id = f"sdk-tea-{uuid.uuid4().hex[:8]}"
    device = devices(ferry, client_id)
    topic = f"sdk/{uuid.uuid4().hex}/tea"
    device.subscribe(topic)
    sent = tea.send_message(models.SendMessageRequest(instance_id=DEFAULT, mqtt_topic=topic,
                                                      payload="from the newer SDK"))
    assert sent.body.msg_id
    assert device.messages.get(timeout=WAIT) == (topic, b"from the newer SDK")
    batch = tea.batch_query_session_by_client_ids(models.BatchQuerySessionByClientIdsRequest(
        instance_id=DEFAULT, client_id_list=[client_id, "sdk-nobody"])).body
    assert [(s.client_id, s.online_status) for s in batch.online_status_list] == [
        (client_id, True), ("sdk-nobody", False)]
    closed = tea.close_connection(models.CloseConnectionRequest(instance_id=DEFAULT,
                                                                client_id=client_id)).body
    assert closed.success is True
    assert device.disconnected.wait(WAIT)
    assert tea.query_session_by_client_id(models.QuerySessionByClientIdRequest(
        instance_id=DEFAULT, client_id=client_id)).body.online_status is False

    instances = tea.list_instances(models.ListInstancesRequest()).body.instances
    assert {DEFAULT, CLOUD} <= {i.instance_id for i in instances}
    with pytest.raises(Exception) as info:
        tea.query_mqtt_trace_device(models.QueryMqttTraceDeviceRequest(
            instance_id=CLOUD, client_id=f"{gid}@@@dev", begin_time=0, end_time=1,
            current_page=1, page_size=10))
    assert getattr(info.value, "code", None) == "UnsupportedOperation", info.value
