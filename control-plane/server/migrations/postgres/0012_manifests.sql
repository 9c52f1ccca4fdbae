-- Declarative tenancy (manifests). Every object keeps its desired spec with a `generation`
-- that moves on each change of that spec (through `POST /v1/apply` or an imperative call)
-- and `meta` (`{"labels", "annotations"}` of its manifest). Tenants also keep:
--   desired_state        the lifecycle state asked for (NULL: whatever the tenant is now)
--   observed_generation  the generation the tenant controller last wrote `status` for
--   status               `{phase, conditions, drift, ...}` as written by the controller
--   settled              1 when the controller has nothing left to do at that generation
--   reconcile_after      when a blocked or failed convergence is tried again
--   reconcile_failures   consecutive failed convergences (the backoff's exponent)
ALTER TABLE tenants ADD COLUMN desired_state TEXT;
ALTER TABLE tenants ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE tenants ADD COLUMN observed_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN status TEXT;
ALTER TABLE tenants ADD COLUMN settled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN reconcile_after TEXT;
ALTER TABLE tenants ADD COLUMN reconcile_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN meta TEXT;
CREATE INDEX tenants_unsettled ON tenants(settled, reconcile_after);

ALTER TABLE cells ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE cells ADD COLUMN meta TEXT;
ALTER TABLE organizations ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE organizations ADD COLUMN meta TEXT;
ALTER TABLE region_policies ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
ALTER TABLE region_policies ADD COLUMN meta TEXT;
