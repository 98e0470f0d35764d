"""The live table of `stream-lstm up` (tools/live_table.py): the end-to-end runs are in
tests/tools/test_demo.py."""

from stream_lstm.tools.live_table import DEVICE_WIDTH, format_forecast

FORECAST = {"ts": 0.0, "device_id": "pump-1", "value": 1.0, "forecast": [1.0] * 3,
            "lower": [0.5] * 3, "upper": [1.5] * 3, "anomaly_score": 2.7,
            "anomaly_likelihood": 0.99995, "is_anomaly": True}


def test_the_live_table_shows_the_likelihood_the_flag_reads():
    line = format_forecast(FORECAST)
    assert line.endswith(" 5e-05 ANOMALY"), line  # 1 - the likelihood, not the raw score
    assert format_forecast({**FORECAST, "anomaly_likelihood": None, "is_anomaly": False}).endswith(" -")


def test_devices_that_share_a_long_prefix_stay_apart_and_values_keep_the_digits_that_matter():
    """Two AWS recordings showed as `ec2_cpu_utiliz` each, and 0.13 as 0.1 [-0.0, 0.2]; a value
    near 1,000 with a narrow interval must not print as 1.01e+03[1.01e+03,1.01e+03]."""
    lines = [format_forecast({**FORECAST, "device_id": d, "value": 0.134, "forecast": [0.131] * 3,
                              "lower": [-0.012] * 3, "upper": [0.27] * 3})
             for d in ("ec2_cpu_utilization_24ae8d", "ec2_cpu_utilization_53ea38")]
    assert "utilization_24ae8d" in lines[0] and "utilization_53ea38" in lines[1]
    assert len(lines[0]) == len(lines[1])  # one column width
    assert "0.13[-0.01,0.27]" in lines[0] and " 0.13 " in lines[0]
    big = format_forecast({**FORECAST, "value": 1013.2, "forecast": [1013.4] * 3, "lower": [1012.1] * 3,
                           "upper": [1014.6] * 3})
    assert "1013.4[1012.1,1014.6]" in big and " 1013.2 " in big
    short = format_forecast(FORECAST)
    assert "pump-1" + " " * (DEVICE_WIDTH - len("pump-1")) in short
