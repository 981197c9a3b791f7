//! What the coordinator's loop refuses, in its own terms. The gRPC handlers are the only place
//! that turns it into a `tonic::Status`, through the one conversion below, so the loop never
//! picks a status code.

use tonic::Status;

/// A refusal or failure of a command to the loop; its text is the message callers see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// No job by that id.
    #[error("no job '{0}'")]
    UnknownJob(String),
    /// The request or spec is malformed or breaks a rule (a bad node name, a bad spec).
    #[error("{0}")]
    Invalid(String),
    /// The thing asked for does not exist (a rank's log in a generation that lacks it).
    #[error("{0}")]
    NotFound(String),
    /// The job is not in a state that allows it (a checkpoint of a job that does not train).
    #[error("{0}")]
    Precondition(String),
    /// A limit is reached (jobs held, bytes held, slots per agent).
    #[error("{0}")]
    LimitReached(String),
    /// The caller is not allowed in (a node the hostfile does not name).
    #[error("{0}")]
    Refused(String),
    /// The name is held by someone else (a node name with a live agent).
    #[error("{0}")]
    NameTaken(String),
    /// Cannot be done now, may work later: writes stopped, a node unreachable, shutting down.
    #[error("{0}")]
    Unavailable(String),
}

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        let msg = e.to_string();
        match e {
            CoreError::UnknownJob(_) | CoreError::NotFound(_) => Status::not_found(msg),
            CoreError::Invalid(_) => Status::invalid_argument(msg),
            CoreError::Precondition(_) => Status::failed_precondition(msg),
            CoreError::LimitReached(_) => Status::resource_exhausted(msg),
            CoreError::Refused(_) => Status::permission_denied(msg),
            CoreError::NameTaken(_) => Status::already_exists(msg),
            CoreError::Unavailable(_) => Status::unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_status_code_and_message() {
        for (e, code) in [
            (CoreError::UnknownJob("j-1".into()), Code::NotFound),
            (CoreError::Invalid("x".into()), Code::InvalidArgument),
            (CoreError::NotFound("x".into()), Code::NotFound),
            (
                CoreError::Precondition("x".into()),
                Code::FailedPrecondition,
            ),
            (CoreError::LimitReached("x".into()), Code::ResourceExhausted),
            (CoreError::Refused("x".into()), Code::PermissionDenied),
            (CoreError::NameTaken("x".into()), Code::AlreadyExists),
            (CoreError::Unavailable("x".into()), Code::Unavailable),
        ] {
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, text.as_str()));
        }
        assert_eq!(
            CoreError::UnknownJob("j-1".into()).to_string(),
            "no job 'j-1'"
        );
    }
}
