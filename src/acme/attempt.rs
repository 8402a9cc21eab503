//! One certificate attempt of the [`Manager`]: the claim (replicas), the
//! ACME account, the precheck, ARI, the order itself, and what its
//! outcome does to the queue, the store and the progress.

use super::*;

impl<S: CertStore> Manager<S> {
    /// One attempt for one host; says whether an order reached the CA.
    /// `current` is the served certificate (DER leaf, our renewal time).
    pub(super) async fn attempt(
        &self,
        target: &Target,
        kind: ChallengeKind,
        current: Option<(Vec<u8>, i64)>,
        expires: Option<i64>,
    ) -> (Option<crate::store::Claim>, bool, Result<Success, Failure>) {
        let (ordered, result) = match self.store.claim(&target.host).await {
            Ok(Ok(claim)) => {
                // A certificate another replica stored since this host was
                // read (it held the claim until it had stored it).
                if let Some(adopted) = self.stored_newer(&target.host, expires).await {
                    return (Some(claim), false, Ok(Success::Adopted(adopted)));
                }
                // Another replica's failed attempt set a backoff: it holds
                // here too (failed validations count cluster-wide).
                if let Some(retry) = self.stored_backoff(&target.host).await {
                    return (Some(claim), false, Ok(Success::Later(retry)));
                }
                let (ordered, result) = self.attempt_claimed(target, kind, current).await;
                return (Some(claim), ordered, result);
            }
            Ok(Err(left)) => {
                tracing::debug!(host = %target.host, "another replica is ordering this certificate");
                // Its certificate is usually announced earlier; if the
                // other replica died, its claim has ended by then.
                let wait =
                    (left + Duration::from_millis(fastrand::u64(100..1000))).min(CLAIMED_RETRY);
                (false, Ok(Success::Later(SystemTime::now() + wait)))
            }
            Err(e) => (
                false,
                Err(Failure::new(
                    FailureKind::Local,
                    format!("cannot claim the order in the shared store: {e}"),
                )),
            ),
        };
        (None, ordered, result)
    }

    /// A certificate of `host` in the store that expires later than
    /// `known` (the one served here), checked and ready to serve.
    pub(super) async fn stored_newer(&self, host: &str, known: Option<i64>) -> Option<Adopted> {
        let state = self.store.load_state(host).await.ok()??;
        let recorded = state.cert_not_after?;
        if known.is_some_and(|k| recorded <= k) {
            return None;
        }
        let bundle = self.store.load_cert(host).await.ok()??;
        let (key, info) = order::inspect(host, &bundle).ok()?;
        if info.not_after <= unix(SystemTime::now()) || known.is_some_and(|k| info.not_after <= k) {
            return None;
        }
        Some(Adopted {
            key: Arc::new(key),
            not_before: info.not_before,
            not_after: info.not_after,
            state,
        })
    }

    /// The retry time a failed attempt stored for `host`, if it is still
    /// ahead (with a shared store, another replica's failure).
    pub(super) async fn stored_backoff(&self, host: &str) -> Option<SystemTime> {
        let state = self.store.load_state(host).await.ok()??;
        let next = state.next_attempt.filter(|_| state.failures > 0)?;
        (next > unix(SystemTime::now())).then(|| schedule::from_unix(next))
    }

    /// Serves a certificate another replica stored, and schedules its
    /// renewal like one issued here.
    pub(super) fn adopt(&self, entries: &mut Queue<Scheduled>, host: &str, adopted: Adopted) {
        let now = SystemTime::now();
        let Adopted {
            key,
            not_before,
            not_after,
            state,
        } = adopted;
        let renew = schedule::renew_at(not_before, not_after, self.cfg.renew_before);
        self.index.land(host, key);
        tracing::info!(
            host,
            not_after = %status::fmt_time(not_after),
            "serving the certificate another replica stored"
        );
        let due = self.first_check(renew, now, 1.0);
        entries.update(host, |entry| {
            entry.renew_at = Some(renew);
            entry.expires = Some(not_after);
            entry.state = Scheduled::keep(state);
            entry.due = due;
        });
    }

    /// [`Manager::attempt`] once this process holds the claim.
    pub(super) async fn attempt_claimed(
        &self,
        target: &Target,
        kind: ChallengeKind,
        current: Option<(Vec<u8>, i64)>,
    ) -> (bool, Result<Success, Failure>) {
        let now = SystemTime::now();
        let mut replaces = None;
        if let Some((leaf, renew_at)) = current {
            let due = renew_at <= unix(now);
            let ari = tokio::time::timeout(ARI_TIMEOUT, self.ari(&leaf, renew_at, due));
            let ari = ari.await.unwrap_or_else(|_| {
                tracing::debug!("ARI check timed out");
                if due { Ok(None) } else { Err(now + ARI_POLL) }
            });
            match ari {
                Ok(Some(id)) => replaces = Some(id),
                Ok(None) => {}
                Err(later) if !due => return (false, Ok(Success::Later(later))),
                Err(_) => {}
            }
        }
        if self.cfg.precheck_dns
            && let Err(message) = self.precheck(target).await
        {
            return (false, Err(Failure::new(FailureKind::Dns, message)));
        }
        // Pacing: wait for a slot in the hourly window (this holds one of
        // the concurrency slots, which is what bounds the queue anyway).
        loop {
            let wait = self.pacer_lock().take(unix(SystemTime::now()));
            match wait {
                Ok(()) => break,
                Err(wait) => tokio::time::sleep(wait.min(MAX_SLEEP)).await,
            }
        }
        // Replicas sharing a store count the CA's hourly budget together.
        loop {
            match self
                .store
                .order_slot(&target.host, self.cfg.orders_per_hour)
                .await
            {
                Ok(None) => break,
                Ok(Some(wait)) => tokio::time::sleep(wait.min(MAX_SLEEP)).await,
                Err(e) => {
                    return (
                        false,
                        Err(Failure::new(
                            FailureKind::Local,
                            format!("cannot count orders in the shared store: {e}"),
                        )),
                    );
                }
            }
        }
        // Each request is bounded in `order` (30 s); this bounds the whole
        // exchange, so a CA that answers slowly but never finishes cannot
        // hold a concurrency slot forever.
        let exchange = async {
            let account = self.account().await?;
            order::issue(
                &account,
                &self.creating,
                &target.host,
                kind,
                self.cfg.key_type,
                &self.challenges,
                replaces,
            )
            .await
        };
        let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::new(
                FailureKind::Ca,
                format!(
                    "no answer from the CA within {} s",
                    ATTEMPT_TIMEOUT.as_secs()
                ),
            )),
        };
        if let Err(f) = &result
            && f.account_gone
        {
            tracing::warn!("the CA does not know our account any more; creating a new one");
            self.account_gone
                .store(true, std::sync::atomic::Ordering::Relaxed);
            *self.account.lock().await = None;
        }
        (true, result.map(|i| Success::Issued(Box::new(i))))
    }

    /// ARI (RFC 9773) for the served certificate: `Ok(Some(id))` renew now,
    /// replacing `id` (exempt from Let's Encrypt's order limits); `Ok(None)`
    /// renew without ARI; `Err(t)` not yet, look again at `t`. A CA without
    /// ARI (pebble 2.4) answers `Unsupported` once and is not asked again.
    pub(super) async fn ari(
        &self,
        leaf_der: &[u8],
        renew_at: i64,
        due: bool,
    ) -> Result<Option<CertificateIdentifier<'static>>, SystemTime> {
        use std::sync::atomic::Ordering;
        let now = SystemTime::now();
        let own_time = schedule::from_unix(renew_at);
        if self.ari_unsupported.load(Ordering::Relaxed) {
            return if due { Ok(None) } else { Err(own_time) };
        }
        let der = rustls_pki_types::CertificateDer::from(leaf_der);
        let Ok(id) = CertificateIdentifier::try_from(&der) else {
            return if due { Ok(None) } else { Err(own_time) };
        };
        let id = id.into_owned();
        // A CA that cannot be asked now is asked again later; our own
        // renewal time still holds.
        let retry = own_time.min(now + ARI_POLL);
        let account = match self.account().await {
            Ok(a) => a,
            Err(f) => {
                tracing::debug!(error = %f.message, "no account for an ARI check");
                return if due { Ok(None) } else { Err(retry) };
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let window = (
                    info.suggested_window.start.unix_timestamp(),
                    info.suggested_window.end.unix_timestamp(),
                );
                match schedule::ari_decision(
                    unix(now),
                    window,
                    renew_at,
                    retry_after,
                    fastrand::f64(),
                ) {
                    AriDecision::RenewNow => Ok(Some(id)),
                    AriDecision::CheckAt(_) if due => Ok(Some(id)),
                    AriDecision::CheckAt(t) => Err(schedule::from_unix(t)),
                }
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::info!(
                    "the CA has no ACME renewal information (ARI); renewing at 2/3 of the lifetime"
                );
                self.ari_unsupported.store(true, Ordering::Relaxed);
                if due { Ok(None) } else { Err(own_time) }
            }
            Err(e) => {
                tracing::debug!(error = %e, "ARI lookup failed");
                if due { Ok(None) } else { Err(retry) }
            }
        }
    }

    pub(super) async fn precheck(&self, target: &Target) -> Result<(), String> {
        let server = self.cfg.precheck_resolver;
        let resolved = resolve::addresses(&target.host, server).await?;
        let mut expected = target.expected.clone();
        if let Some(cname) = &target.cname {
            expected.extend(resolve::addresses(cname, server).await.unwrap_or_default());
        }
        schedule::precheck(&target.host, &resolved, &expected)
    }

    /// The ACME account: cached, else loaded from the store, else created.
    pub(super) async fn account(&self) -> Result<Account, Failure> {
        use std::sync::atomic::Ordering;
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let builder = || {
            match &self.cfg.ca_roots {
                Some(path) => Account::builder_with_root(path),
                None => Account::builder(),
            }
            .map_err(|e| Failure::ca("ACME client", &e))
        };
        let directory = &self.cfg.directory;
        let stored = if self.account_gone.load(Ordering::Relaxed) {
            None
        } else {
            self.store
                .load_account(directory)
                .await
                .map_err(|e| Failure::new(FailureKind::Local, e.to_string()))?
        };
        let account = match stored {
            Some(bytes) => {
                let creds: AccountCredentials = serde_json::from_slice(&bytes).map_err(|e| {
                    Failure::new(
                        FailureKind::Local,
                        format!("stored ACME account for {directory} is unreadable ({e}); remove it to register anew"),
                    )
                })?;
                builder()?
                    .from_credentials(creds)
                    .await
                    .map_err(|e| Failure::ca("account", &e))?
            }
            None => {
                let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
                let eab = self
                    .cfg
                    .eab
                    .as_ref()
                    .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, creds) = builder()?
                    .create(&new, directory.clone(), eab.as_ref())
                    .await
                    .map_err(|e| Failure::ca("account registration", &e))?;
                let json = serde_json::to_vec(&creds)
                    .map_err(|e| Failure::new(FailureKind::Local, e.to_string()))?;
                self.store
                    .save_account(directory, json)
                    .await
                    .map_err(|e| Failure::new(FailureKind::Local, e.to_string()))?;
                self.account_gone.store(false, Ordering::Relaxed);
                tracing::info!(directory = %directory, account = account.id(), "registered ACME account");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// Records the outcome of an attempt: a new certificate is stored first,
    /// then served; a failure schedules a retry with backoff.
    pub(super) async fn finish(&self, entries: &mut Queue<Scheduled>, done: Attempted) {
        // Released when this returns, after the certificate is stored.
        let Attempted {
            claim: _claim,
            host,
            ordered,
            kind,
            result,
        } = done;
        let now = SystemTime::now();
        let mut state = match entries.get(&host).and_then(|e| e.state.as_deref()) {
            Some(state) => state.clone(),
            None => self
                .store
                .load_state(&host)
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
        };
        if ordered {
            state.last_order_at = Some(unix(now));
            state.last_challenge = Some(kind.as_str().to_owned());
        }
        let issued = match result {
            Ok(Success::Later(at)) => {
                entries.update(&host, |entry| entry.due = at);
                return;
            }
            Ok(Success::Adopted(adopted)) => {
                if entries.get(&host).is_some() {
                    self.adopt(entries, &host, adopted);
                }
                return;
            }
            Ok(Success::Issued(issued)) => Ok(issued),
            Err(f) => Err(f),
        };
        let result = match issued {
            Ok(issued) => match self.store.save_cert(&host, issued.bundle.clone()).await {
                Ok(()) => Ok(issued),
                Err(e) => Err(Failure::new(
                    FailureKind::Local,
                    format!("cannot store the new certificate: {e}"),
                )),
            },
            Err(f) => Err(f),
        };
        // Whether the host is still configured, and if so served.
        let serving = entries.get(&host).map(|e| e.expires.is_some());
        // The new certificate (renewal time, expiry, key) of a host that is
        // still configured.
        let mut serve = None;
        let due = match result {
            Ok(issued) => {
                let info = issued.info.clone();
                state.failures = 0;
                state.last_error = None;
                state.last_error_at = None;
                state.waiting_dns = false;
                state.next_attempt = None;
                state.issued_at = Some(unix(now));
                state.directory = Some(self.cfg.directory.clone());
                state.cert_not_before = Some(info.not_before);
                state.cert_not_after = Some(info.not_after);
                if let Some(used) = issued.challenge {
                    state.last_challenge = Some(used.as_str().to_owned());
                }
                let mut renew =
                    schedule::renew_at(info.not_before, info.not_after, self.cfg.renew_before);
                if renew <= unix(now) {
                    tracing::warn!(host = %host, "renew_before is longer than the certificate lifetime; renewing after retry_initial");
                    renew = unix(schedule::after(now, self.cfg.retry_initial));
                }
                tracing::info!(
                    host = %host,
                    issuer = %info.issuer,
                    serial = %info.serial,
                    not_after = %status::fmt_time(info.not_after),
                    renew_at = %status::fmt_time(renew),
                    "certificate issued"
                );
                if serving.is_some() {
                    // Only a host still configured is served (below, once
                    // its state is recorded).
                    serve = Some((renew, info.not_after, Arc::new(issued.key)));
                    self.progress_lock().issued += 1;
                }
                self.first_check(renew, now, 1.0)
            }
            Err(f) => {
                state.failures = state.failures.saturating_add(1);
                state.waiting_dns = f.kind == FailureKind::Dns;
                state.last_error = Some(f.message.clone());
                state.last_error_at = Some(unix(now));
                let delay = schedule::backoff(
                    state.failures,
                    self.cfg.retry_initial,
                    self.cfg.retry_max,
                    fastrand::f64(),
                );
                let retry = schedule::after(now, delay);
                state.next_attempt = Some(unix(retry));
                let serving = serving == Some(true);
                tracing::warn!(
                    host = %host,
                    failures = state.failures,
                    retry_in = %humantime::format_duration(Duration::from_millis(
                        u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    )),
                    serving_current = serving,
                    "certificate attempt failed: {}",
                    f.message
                );
                retry
            }
        };
        if let Err(e) = self.store.save_state(&host, &state).await {
            tracing::error!(host = %host, error = %e, "cannot store certificate state");
        }
        // Served last: whoever sees the new certificate also finds its
        // state (and `mtasts certs` never shows a stale error for it).
        let landed = serve.map(|(renew, not_after, key)| {
            self.index.land(&host, key);
            (renew, not_after)
        });
        entries.update(&host, |entry| {
            if let Some((renew, not_after)) = landed {
                entry.renew_at = Some(renew);
                entry.expires = Some(not_after);
            }
            entry.state = Scheduled::keep(state);
            entry.due = due;
        });
    }
}
