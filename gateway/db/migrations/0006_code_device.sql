-- Code <-> customer device binding at issuance (单设备绑定, the risk engine's device_binding rule): a code issued
-- for one customer device answers only that device once the rule is on. NULL: bound at first presentation, if at
-- all. A device id is not a secret (the app installation's id), so it is stored as is.
ALTER TABLE issued_codes
    ADD COLUMN bound_device text CHECK (bound_device ~ '^[A-Za-z0-9._:-]{1,128}$');
