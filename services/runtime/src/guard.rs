//! The front door of every service: checks each call against the committed interface
//! description before the service sees it.
//!
//! zlink 0.8 drops the connection when a call names an unknown method or carries parameters that
//! do not deserialize. The varlink specification wants `org.varlink.service.MethodNotFound` and
//! `org.varlink.service.InvalidParameter` replies instead, and systemd's `varlinkctl` shows them to
//! people. [`Guarded`] reads every call as raw JSON, validates it against the IDL, refuses
//! state-changing methods to callers that are not allowed, and only then hands a typed call to the
//! service the `#[zlink::service]` macro generated.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::rc::Rc;

use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zlink::connection::socket::{FetchPeerCredentials, Socket};
use zlink::idl::{self, Type};
use zlink::service::{HandleResult, MethodReply};
use zlink::{Call, Connection, Service};

/// Who may call the state-changing methods of a service.
#[derive(Debug, Clone)]
pub struct Policy {
    interface: String,
    /// Method name (unqualified) → its input parameters, from the IDL.
    methods: BTreeMap<String, Vec<Param>>,
    /// Custom types of the interface: name → shape.
    types: BTreeMap<String, Shape>,
    /// Unqualified names of the methods that only privileged callers may call.
    privileged: BTreeSet<String>,
    /// Users besides root allowed to call privileged methods (only the guard's tests add any).
    allowed_uids: BTreeSet<u32>,
}

#[derive(Debug, Clone)]
struct Param {
    name: String,
    ty: Shape,
}

/// What a value of an IDL type must look like in JSON.
#[derive(Debug, Clone)]
enum Shape {
    Bool,
    Int,
    Float,
    String,
    Any,
    Optional(Box<Shape>),
    Array(Box<Shape>),
    Map(Box<Shape>),
    Custom(String),
    Enum(Vec<String>),
    Object(Vec<Param>),
}

impl Shape {
    fn from_idl(ty: &Type<'_>) -> Self {
        match ty {
            Type::Bool => Shape::Bool,
            Type::Int => Shape::Int,
            Type::Float => Shape::Float,
            Type::String => Shape::String,
            Type::ForeignObject | Type::Any => Shape::Any,
            Type::Optional(t) => Shape::Optional(Box::new(Shape::from_idl(t))),
            Type::Array(t) => Shape::Array(Box::new(Shape::from_idl(t))),
            Type::Map(t) => Shape::Map(Box::new(Shape::from_idl(t))),
            Type::Custom(name) => Shape::Custom(name.to_string()),
            Type::Enum(variants) => {
                Shape::Enum(variants.iter().map(|v| v.name().to_string()).collect())
            }
            Type::Object(fields) => Shape::Object(params(fields.iter())),
        }
    }
}

fn params<'a, 'b: 'a>(fields: impl Iterator<Item = &'a idl::Field<'b>>) -> Vec<Param> {
    fields
        .map(|f| Param {
            name: f.name().to_string(),
            ty: Shape::from_idl(f.ty()),
        })
        .collect()
}

/// Why a call was refused before reaching the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `org.varlink.service.MethodNotFound`.
    MethodNotFound(String),
    /// `org.varlink.service.InvalidParameter`.
    InvalidParameter(String),
    /// `<interface>.PermissionDenied`.
    PermissionDenied(String),
}

impl Policy {
    /// Builds the policy of the interface described by `idl`; `privileged` names the methods
    /// (unqualified) that change state.
    pub fn new(idl: &str, privileged: &[&str]) -> anyhow::Result<Self> {
        let iface = idl::Interface::try_from(idl)
            .map_err(|e| anyhow::anyhow!("Parsing the interface description: {e}"))?;
        let methods: BTreeMap<_, _> = iface
            .methods()
            .map(|m| (m.name().to_string(), params(m.inputs())))
            .collect();
        for name in privileged {
            anyhow::ensure!(
                methods.contains_key(*name),
                "Privileged method {name} is not in the interface"
            );
        }
        let types = iface
            .custom_types()
            .map(|t| {
                let shape = match t {
                    idl::CustomType::Object(o) => Shape::Object(params(o.fields())),
                    idl::CustomType::Enum(e) => {
                        Shape::Enum(e.variants().map(|v| v.name().to_string()).collect())
                    }
                };
                (t.name().to_string(), shape)
            })
            .collect();
        Ok(Self {
            interface: iface.name().to_string(),
            methods,
            types,
            privileged: privileged.iter().map(|s| s.to_string()).collect(),
            allowed_uids: BTreeSet::new(),
        })
    }

    /// Also lets `uid` call privileged methods. The services never do (root only): no switch of
    /// theirs lets another user in; for the guard's own tests.
    #[cfg(test)]
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allowed_uids.insert(uid);
        self
    }

    /// Whether `uid` may call the privileged methods.
    pub fn is_privileged(&self, uid: u32) -> bool {
        uid == 0 || self.allowed_uids.contains(&uid)
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Checks a call's method and parameters; `uid` is the caller's, when known.
    pub fn check(
        &self,
        method: &str,
        parameters: Option<&Value>,
        uid: impl FnOnce() -> Option<u32>,
    ) -> Result<(), Refusal> {
        let not_found = || Refusal::MethodNotFound(method.to_string());
        let (iface, name) = method.rsplit_once('.').ok_or_else(not_found)?;
        if iface == "org.varlink.service" {
            return match name {
                "GetInfo" => self.check_object(parameters, &[]),
                "GetInterfaceDescription" => self.check_object(
                    parameters,
                    &[Param {
                        name: "interface".into(),
                        ty: Shape::String,
                    }],
                ),
                _ => Err(not_found()),
            };
        }
        if iface != self.interface {
            return Err(not_found());
        }
        let inputs = self.methods.get(name).ok_or_else(not_found)?;
        self.check_object(parameters, inputs)?;
        if self.privileged.contains(name) {
            let allowed = uid().is_some_and(|u| self.is_privileged(u));
            if !allowed {
                return Err(Refusal::PermissionDenied(name.to_string()));
            }
        }
        Ok(())
    }

    fn check_object(&self, parameters: Option<&Value>, inputs: &[Param]) -> Result<(), Refusal> {
        let empty = serde_json::Map::new();
        let map = match parameters {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(map)) => map,
            Some(_) => return Err(Refusal::InvalidParameter("parameters".into())),
        };
        self.check_fields(map, inputs, "")
    }

    fn check_fields(
        &self,
        map: &serde_json::Map<String, Value>,
        fields: &[Param],
        prefix: &str,
    ) -> Result<(), Refusal> {
        for key in map.keys() {
            if !fields.iter().any(|f| &f.name == key) {
                return Err(Refusal::InvalidParameter(format!("{prefix}{key}")));
            }
        }
        for field in fields {
            let path = format!("{prefix}{}", field.name);
            self.check_value(map.get(&field.name), &field.ty, &path)?;
        }
        Ok(())
    }

    fn check_value(&self, value: Option<&Value>, shape: &Shape, path: &str) -> Result<(), Refusal> {
        let bad = || Err(Refusal::InvalidParameter(path.to_string()));
        let value = match (value, shape) {
            (None | Some(Value::Null), Shape::Optional(_) | Shape::Any) => return Ok(()),
            (None | Some(Value::Null), _) => return bad(),
            (Some(v), _) => v,
        };
        match shape {
            Shape::Optional(inner) => self.check_value(Some(value), inner, path),
            Shape::Any => Ok(()),
            Shape::Bool if value.is_boolean() => Ok(()),
            Shape::Int if value.is_i64() || value.is_u64() => Ok(()),
            Shape::Float if value.is_number() => Ok(()),
            Shape::String if value.is_string() => Ok(()),
            Shape::Enum(variants) => match value.as_str() {
                Some(s) if variants.iter().any(|v| v == s) => Ok(()),
                _ => bad(),
            },
            Shape::Array(inner) => match value.as_array() {
                Some(items) => items.iter().enumerate().try_for_each(|(i, v)| {
                    self.check_value(Some(v), inner, &format!("{path}[{i}]"))
                }),
                None => bad(),
            },
            Shape::Map(inner) => match value.as_object() {
                Some(map) => map.iter().try_for_each(|(k, v)| {
                    self.check_value(Some(v), inner, &format!("{path}.{k}"))
                }),
                None => bad(),
            },
            Shape::Object(fields) => match value.as_object() {
                Some(map) => self.check_fields(map, fields, &format!("{path}.")),
                None => bad(),
            },
            Shape::Custom(name) => match self.types.get(name) {
                Some(shape) => self.check_value(Some(value), shape, path),
                None => bad(),
            },
            _ => bad(),
        }
    }

    fn refusal_reply(&self, refusal: Refusal) -> RawError {
        match refusal {
            Refusal::MethodNotFound(method) => RawError {
                error: "org.varlink.service.MethodNotFound".into(),
                parameters: serde_json::json!({ "method": method }),
            },
            Refusal::InvalidParameter(parameter) => RawError {
                error: "org.varlink.service.InvalidParameter".into(),
                parameters: serde_json::json!({ "parameter": parameter }),
            },
            Refusal::PermissionDenied(method) => RawError {
                error: format!("{}.PermissionDenied", self.interface),
                parameters: serde_json::json!({ "method": method }),
            },
        }
    }
}

/// A method call read as raw JSON.
#[derive(Debug, Deserialize)]
pub struct RawMethod {
    method: String,
    #[serde(default)]
    parameters: Option<Value>,
}

/// An error reply written by the guard itself.
#[derive(Debug, Serialize)]
pub struct RawError {
    error: String,
    parameters: Value,
}

/// Either the service's own error or one the guard produced.
#[derive(Debug)]
pub enum GuardError<E> {
    /// The service's error.
    Service(E),
    /// The guard's error.
    Guard(RawError),
}

impl<E: Serialize> Serialize for GuardError<E> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            GuardError::Service(e) => e.serialize(serializer),
            GuardError::Guard(e) => e.serialize(serializer),
        }
    }
}

/// A service behind the guard.
#[derive(Debug)]
pub struct Guarded<S, Sock: Socket>
where
    S: Service<Sock>,
{
    inner: S,
    policy: Rc<Policy>,
    /// The peer's user id, read once when the connection was accepted.
    uid: Option<u32>,
    // The typed call being handled: the service's reply may borrow from it.
    current: Option<Call<S::MethodCall<'static>>>,
}

impl<S, Sock> Guarded<S, Sock>
where
    Sock: Socket,
    S: Service<Sock>,
{
    /// Puts `inner`, serving a peer of user `uid`, behind `policy`.
    pub fn new(inner: S, policy: Rc<Policy>, uid: Option<u32>) -> Self {
        Self {
            inner,
            policy,
            uid,
            current: None,
        }
    }
}

impl<S, Sock> Service<Sock> for Guarded<S, Sock>
where
    Sock: Socket,
    Sock::ReadHalf: FetchPeerCredentials,
    S: Service<Sock>,
{
    type MethodCall<'de> = RawMethod;
    type ReplyParams<'ser>
        = S::ReplyParams<'ser>
    where
        Self: 'ser;
    type ReplyStreamParams = S::ReplyStreamParams;
    type ReplyStreamError = S::ReplyStreamError;
    type ReplyStream = S::ReplyStream;
    type ReplyError<'ser>
        = GuardError<S::ReplyError<'ser>>
    where
        Self: 'ser;
    type Upgrade = S::Upgrade;

    async fn handle<'ser>(
        &'ser mut self,
        call: &'ser Call<Self::MethodCall<'_>>,
        conn: &mut Connection<Sock>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> HandleResult<
        Self::ReplyParams<'ser>,
        Self::ReplyStream,
        Self::ReplyError<'ser>,
        Self::Upgrade,
    > {
        let raw = call.method();
        let uid = self.uid;
        let refuse = |policy: &Policy, r: Refusal| {
            tracing::info!(method = %raw.method, "Refusing call: {r:?}");
            (
                MethodReply::Error(GuardError::Guard(policy.refusal_reply(r))),
                Vec::new(),
            )
        };
        if let Err(r) = self
            .policy
            .check(&raw.method, raw.parameters.as_ref(), || uid)
        {
            return refuse(&self.policy, r);
        }
        let mut value = serde_json::Map::new();
        value.insert("method".into(), Value::String(raw.method.clone()));
        if let Some(p) = &raw.parameters {
            value.insert("parameters".into(), p.clone());
        }
        let typed = match S::MethodCall::<'static>::deserialize(
            Value::Object(value).into_deserializer(),
        ) {
            Ok(typed) => typed,
            Err(e) => {
                // The IDL check passed but the service's types disagree: that is drift between
                // the IDL and the code, which the interface tests catch; tell the caller anyway.
                tracing::warn!(method = %raw.method, "Parameters do not fit the service's types: {e}");
                return refuse(
                    &self.policy,
                    Refusal::InvalidParameter(field_of(&e.to_string())),
                );
            }
        };
        let Self { inner, current, .. } = self;
        let typed_call = current.insert(
            Call::new(typed)
                .set_more(call.more())
                .set_oneway(call.oneway())
                .set_upgrade(call.upgrade()),
        );
        let (reply, fds) = inner.handle(typed_call, conn, fds).await;
        let reply = match reply {
            MethodReply::Single(p) => MethodReply::Single(p),
            MethodReply::Error(e) => MethodReply::Error(GuardError::Service(e)),
            MethodReply::Multi(s) => MethodReply::Multi(s),
            MethodReply::Upgrade(p, u) => MethodReply::Upgrade(p, u),
            _ => MethodReply::Error(GuardError::Guard(RawError {
                error: "org.varlink.service.InvalidParameter".into(),
                parameters: serde_json::json!({ "parameter": "method" }),
            })),
        };
        (reply, fds)
    }
}

/// The field a serde error names (`missing field `x``), or "parameters".
fn field_of(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "parameters".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDL: &str = "\
# Test interface.
interface org.example.Test

# A colour.
type Colour (red, green)

# A thing.
type Thing (
  # Its name.
  name: string,
  # Its size.
  size: ?int
)

# Reads.
method Get(name: string, colour: ?Colour) -> (thing: Thing)

# Writes.
method Put(thing: Thing, tags: []string, extra: [string]int) -> ()

# Not found.
error NotFound ()
";

    #[test]
    fn checks_calls_against_the_idl() {
        let policy = Policy::new(IDL, &["Put"]).unwrap().allow_uid(1000);
        let j = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let put = r#"{"thing":{"name":"a"},"tags":["x"],"extra":{"k":1}}"#;
        type Case<'a> = (&'a str, Option<&'a str>, Option<u32>, Result<(), Refusal>);
        let cases: &[Case] = &[
            (
                "org.example.Test.Get",
                Some(r#"{"name":"a"}"#),
                Some(5),
                Ok(()),
            ),
            (
                "org.example.Test.Get",
                Some(r#"{"name":"a","colour":"red"}"#),
                None,
                Ok(()),
            ),
            (
                "org.example.Test.Get",
                Some(r#"{"name":"a","colour":"blue"}"#),
                None,
                Err(Refusal::InvalidParameter("colour".into())),
            ),
            (
                "org.example.Test.Get",
                Some("{}"),
                None,
                Err(Refusal::InvalidParameter("name".into())),
            ),
            (
                "org.example.Test.Get",
                None,
                None,
                Err(Refusal::InvalidParameter("name".into())),
            ),
            (
                "org.example.Test.Get",
                Some(r#"{"name":1}"#),
                None,
                Err(Refusal::InvalidParameter("name".into())),
            ),
            (
                "org.example.Test.Get",
                Some(r#"{"name":"a","bogus":1}"#),
                None,
                Err(Refusal::InvalidParameter("bogus".into())),
            ),
            (
                "org.example.Test.Nope",
                Some("{}"),
                None,
                Err(Refusal::MethodNotFound("org.example.Test.Nope".into())),
            ),
            (
                "org.other.Get",
                Some("{}"),
                None,
                Err(Refusal::MethodNotFound("org.other.Get".into())),
            ),
            (
                "Get",
                None,
                None,
                Err(Refusal::MethodNotFound("Get".into())),
            ),
            ("org.varlink.service.GetInfo", Some("{}"), None, Ok(())),
            (
                "org.varlink.service.Nope",
                None,
                None,
                Err(Refusal::MethodNotFound("org.varlink.service.Nope".into())),
            ),
            ("org.example.Test.Put", Some(put), Some(0), Ok(())),
            ("org.example.Test.Put", Some(put), Some(1000), Ok(())),
            (
                "org.example.Test.Put",
                Some(put),
                Some(1001),
                Err(Refusal::PermissionDenied("Put".into())),
            ),
            (
                "org.example.Test.Put",
                Some(put),
                None,
                Err(Refusal::PermissionDenied("Put".into())),
            ),
            (
                "org.example.Test.Put",
                Some(r#"{"thing":{"name":"a","size":"big"},"tags":[],"extra":{}}"#),
                Some(0),
                Err(Refusal::InvalidParameter("thing.size".into())),
            ),
            (
                "org.example.Test.Put",
                Some(r#"{"thing":{"name":"a"},"tags":[1],"extra":{}}"#),
                Some(0),
                Err(Refusal::InvalidParameter("tags[0]".into())),
            ),
            (
                "org.example.Test.Put",
                Some(r#"{"thing":{"name":"a"},"tags":[],"extra":{"k":"v"}}"#),
                Some(0),
                Err(Refusal::InvalidParameter("extra.k".into())),
            ),
        ];
        for (method, params, uid, want) in cases {
            let params = params.map(j);
            let got = policy.check(method, params.as_ref(), || *uid);
            assert_eq!(&got, want, "{method} {params:?} uid={uid:?}");
        }
    }

    #[test]
    fn refuses_unknown_privileged_method() {
        assert!(Policy::new(IDL, &["Delete"]).is_err());
    }

    #[test]
    fn names_the_field_of_a_serde_error() {
        assert_eq!(field_of("missing field `image`"), "image");
        assert_eq!(field_of("invalid type: string"), "parameters");
    }
}
