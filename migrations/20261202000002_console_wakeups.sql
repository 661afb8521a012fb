-- Console followers wait for a notification instead of polling: `cimaster_console` carries the run
-- id whenever a chunk of its log is written or its state moves (status, attempt, stored log).
CREATE FUNCTION cimaster_notify_console() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'run_console' THEN
        PERFORM pg_notify('cimaster_console', NEW.run_id::text);
    ELSE
        PERFORM pg_notify('cimaster_console', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER run_console_written AFTER INSERT ON run_console
    FOR EACH ROW EXECUTE FUNCTION cimaster_notify_console();

CREATE TRIGGER run_progressed AFTER UPDATE ON runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempt IS DISTINCT FROM NEW.attempt
          OR OLD.console_key IS DISTINCT FROM NEW.console_key)
    EXECUTE FUNCTION cimaster_notify_console();
